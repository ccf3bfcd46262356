"""Our own species classifier: the re-ID backbone family with a cross-entropy head, on animal crops.

It routes each crop to the gallery of its species when SpeciesNet does not know the local species
(or is not wanted). The network is `build_model(cfg)` (timm backbone, GeM, neck) with a Linear
head on the neck's output, trained with the library's transforms and dataset, so that any
backbone and local weights file the re-ID recipes use works here too.

A checkpoint holds the weights, the classes, the config, the preprocessing, the crop settings and
the confidence below which a prediction is "unknown".
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from reid.data.dataset import ReIDDataset, read_image
from reid.data.transforms import build_transforms
from reid.embedding.embedder import default_device
from reid.errors import DataError, ReidError
from reid.io import save_torch, write_jsonl
from reid.model.build import ReIDModel, build_model, preprocessing
from reid.species.crops import crop
from reid.species.speciesnet import UNKNOWN
from reid.checkpoint import load_checkpoint

CHECKPOINT_KIND = "species-classifier"
BOX_COLUMNS = ["x", "y", "w", "h"]
SHOWN = 5  # problem rows listed in one message


# ------------------------------------------------------------------------------------ data
def species_table(source: str | Path, image_root: str | Path | None = None) -> pd.DataFrame:
    """Training rows from a CSV: `path` (or `file`, as in the scenes' ground truth), `species`,
    optionally a normalised box `x,y,w,h` (empty: the whole image), `category` (rows of other
    categories than animal are left out) and `encounter` (kept together when splitting).

    Relative paths start at `image_root`, else at the CSV's folder. Returns the columns path
    (absolute), species, x, y, w, h, encounter (when given) and row (the CSV line).
    """
    source = Path(source)
    if not source.is_file():
        raise DataError(f"species table '{source}' not found; give a CSV with columns path (or file) and species")
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not a readable CSV ({exc})") from None
    table["row"] = range(2, len(table) + 2)
    column = "path" if "path" in table.columns else "file"
    if column not in table.columns or "species" not in table.columns:
        raise DataError(f"{source} needs columns path (or file) and species; it has {', '.join(table.columns[:-1])}")
    if "category" in table.columns:
        table = table[table["category"] == "animal"]
    table = table.rename(columns={column: "path"})
    table["species"] = table["species"].str.strip()
    _check_filled(table, "species", source)
    table["path"] = [os.path.abspath(os.path.join(image_root or source.parent, p)) for p in table["path"]]
    boxes = _boxes(table, source)
    table = pd.concat([table.drop(columns=BOX_COLUMNS, errors="ignore").reset_index(drop=True), boxes], axis=1)
    missing = table.loc[~table["path"].map(os.path.isfile), ["row", "path"]]
    if len(missing):
        listed = "; ".join(f"line {r}: {p}" for r, p in missing.head(SHOWN).itertuples(index=False))
        raise DataError(f"{source}: {len(missing)} images not found ({listed}); fix the paths or pass the image folder")
    keep = ["path", "species", *BOX_COLUMNS, *(["encounter"] if "encounter" in table.columns else []), "row"]
    return table[keep]


def _check_filled(table: pd.DataFrame, column: str, source: Path) -> None:
    empty = table.loc[table[column] == "", "row"]
    if len(empty):
        raise DataError(f"{source}: empty {column} on lines {', '.join(map(str, empty.head(SHOWN)))}")


def _boxes(table: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The x, y, w, h columns as floats, NaN where a row names no box (the whole image)."""
    present = [c for c in BOX_COLUMNS if c in table.columns]
    if not present:
        return pd.DataFrame(np.nan, index=range(len(table)), columns=BOX_COLUMNS)
    if len(present) < 4:
        raise DataError(f"{source}: a box needs all of x, y, w, h; the table has only {', '.join(present)}")
    boxes = table[BOX_COLUMNS].reset_index(drop=True).replace("", np.nan)
    rows = table["row"].to_numpy()
    try:
        boxes = boxes.astype(float)
    except ValueError as exc:
        raise DataError(f"{source}: box columns x, y, w, h must be numbers ({exc})") from None
    partial = boxes.isna().any(axis=1) & boxes.notna().any(axis=1)
    outside = ~(boxes.isna() | ((boxes >= 0) & (boxes <= 1))).all(axis=1)
    for bad, problem in ((partial, "has only part of its box x, y, w, h"),
                         (outside, "has box values outside [0, 1]; boxes are normalised by the image size")):
        if bad.any():
            raise DataError(f"{source}: line {rows[bad.to_numpy()][0]} {problem}")
    return boxes


class CropDataset(ReIDDataset):
    """ReIDDataset whose items are crops of normalised boxes (NaN box: the whole image)."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, boxes: np.ndarray, transform, padding: float,
                 square: bool):
        super().__init__(paths, labels, transform)
        self.boxes, self.padding, self.square = np.asarray(boxes, dtype=float), padding, square

    def _image(self, index: int) -> np.ndarray:
        image = super()._image(index)
        box = self.boxes[index]
        return image if np.isnan(box).any() else crop(image, tuple(box), self.padding, self.square)[0]


def _split(labels: np.ndarray, groups: np.ndarray, fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices: per species, whole groups (encounters: frames of one burst look
    alike) go to validation until it holds `fraction` of the species' rows."""
    val = np.zeros(len(labels), dtype=bool)
    _, group_of = np.unique(groups, return_inverse=True)
    for label in np.unique(labels):
        members = labels == label
        wanted = int(fraction * members.sum())
        for group in rng.permutation(np.unique(group_of[members])):
            if val[members].sum() >= wanted:
                break
            val |= members & (group_of == group)
    return np.flatnonzero(~val), np.flatnonzero(val)


# ----------------------------------------------------------------------------------- model
class SpeciesModel(nn.Module):
    """The re-ID network (backbone, GeM, neck) and a Linear species head on the neck's output."""

    def __init__(self, reid: ReIDModel, classes: int):
        super().__init__()
        self.reid = reid
        self.head = nn.Linear(reid.neck[1].out_features, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.reid.neck(self.reid.features(images)))


def _loader(dataset, indices: np.ndarray, batch_size: int, num_workers: int, rng: np.random.Generator | None):
    """Shuffled (index, seed) items for training, so augmentation depends on the seed alone; plain
    indices in order for evaluation."""
    if rng is None:
        return DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=num_workers)
    order, seeds = rng.permutation(indices), rng.integers(2**31, size=len(indices))
    # BatchNorm cannot train on a batch of one: drop a last lone item
    return DataLoader(dataset, batch_size=batch_size, sampler=list(zip(order.tolist(), seeds.tolist())),
                      num_workers=num_workers, drop_last=len(order) % batch_size == 1)


def _run_epoch(model: SpeciesModel, loader: DataLoader, device: torch.device,
               optimizer: torch.optim.Optimizer | None = None, scheduler=None, progress: bool = False) -> dict:
    """Mean cross-entropy and accuracy over the loader; trains when given an optimizer."""
    model.train(optimizer is not None)
    total, loss_sum, correct = 0, 0.0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for images, labels, _ in tqdm(loader, disable=not progress, leave=False, unit="batch"):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            total += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def train_species_classifier(cfg: dict, table: pd.DataFrame, out: str | Path, val_fraction: float = 0.2,
                             threshold: float = 0.5, padding: float = 0.05, square: bool = True,
                             batch_size: int | None = None, progress: bool = False,
                             on_epoch: Callable[[dict, bool], None] | None = None) -> Path:
    """Train on `table` (species_table's columns) and write out/species.pt and out/metrics.jsonl.

    `on_epoch(row, kept)` hears each epoch's metrics.jsonl row, and whether it became the checkpoint.

    Uses the config's model, data.image_size, data.num_workers, seed and train.epochs, lr,
    head_lr_mult (neck and head), weight_decay; the batch size defaults to sampler.p x sampler.k.
    With a validation split the checkpoint is the epoch of best validation accuracy, else the
    last; both files are rewritten atomically after every epoch. Returns the checkpoint path.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ReidError(f"species threshold {threshold} is not between 0 and 1")
    classes = sorted(table["species"].unique())
    if len(classes) < 2:
        raise DataError(f"a species classifier needs at least two species; the table has {classes or 'none'}")
    labels = table["species"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    rng = np.random.default_rng(cfg["seed"])
    groups = table["encounter"].to_numpy() if "encounter" in table.columns else np.arange(len(table))
    train_idx, val_idx = _split(labels, groups, val_fraction, rng)
    if len(train_idx) < 2:
        raise DataError(f"only {len(train_idx)} training images after the validation split; add images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg["seed"])
    device = default_device()
    model = SpeciesModel(build_model(cfg), len(classes)).to(device)
    mean, std = preprocessing(model.reid)
    size, workers = cfg["data"]["image_size"], cfg["data"]["num_workers"]
    boxes = table[BOX_COLUMNS].to_numpy(dtype=float)
    datasets = {train: CropDataset(table["path"].tolist(), labels, boxes,
                                   build_transforms(size, mean, std, train=train, hflip=True), padding, square)
                for train in (True, False)}  # a species looks the same mirrored
    tcfg = cfg["train"]
    batch_size = batch_size or cfg["sampler"]["p"] * cfg["sampler"]["k"]
    heads = [*model.reid.pool.parameters(), *model.reid.neck.parameters(), *model.head.parameters()]
    optimizer = torch.optim.AdamW([{"params": model.reid.backbone.parameters(), "lr": tcfg["lr"]},
                                   {"params": heads, "lr": tcfg["lr"] * tcfg["head_lr_mult"]}],
                                  weight_decay=tcfg["weight_decay"])
    steps = max(1, len(train_idx) // batch_size + (len(train_idx) % batch_size > 1)) * tcfg["epochs"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    checkpoint, history, best = out / "species.pt", [], -1.0
    for epoch in range(1, tcfg["epochs"] + 1):
        start = time.perf_counter()
        loader = _loader(datasets[True], train_idx, batch_size, workers, rng)
        train = _run_epoch(model, loader, device, optimizer, scheduler, progress)
        val = (_run_epoch(model, _loader(datasets[False], val_idx, cfg["eval"]["batch_size"], workers, None), device)
               if len(val_idx) else {"loss": None, "accuracy": None})
        row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "train_images": len(train_idx),
               "val_images": len(val_idx), "seconds": time.perf_counter() - start}
        history.append(row)
        score = val["accuracy"] if val["accuracy"] is not None else epoch
        kept = score >= best  # ties go to the later, longer-trained epoch
        if kept:
            best = score
            save_torch(checkpoint, {
                "kind": CHECKPOINT_KIND, "model": model.state_dict(), "classes": classes, "config": cfg,
                "preprocessing": {"image_size": size, "mean": list(mean), "std": list(std)},
                "crop": {"padding": padding, "square": square}, "threshold": threshold, "epoch": epoch,
                "metrics": row})
        write_jsonl(out / "metrics.jsonl", history)
        if on_epoch is not None:
            on_epoch(row, kept)
    return checkpoint


# ------------------------------------------------------------------------------- inference
class SpeciesClassifier:
    """A trained species classifier: `predict` on crops, `species_for` on a file and box."""

    def __init__(self, model: SpeciesModel, classes: Sequence[str], image_size: int, mean: Sequence[float],
                 std: Sequence[float], threshold: float, padding: float, square: bool,
                 device: torch.device | None = None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.classes, self.threshold, self.padding, self.square = list(classes), threshold, padding, square
        self.transform = build_transforms(image_size, mean, std, train=False, hflip=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold: float | None = None,
                        device: torch.device | None = None) -> SpeciesClassifier:
        """The classifier of a species.pt, built offline; `threshold` overrides the trained one."""
        state = load_checkpoint(path)
        if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
            raise ReidError(f"'{path}' is not a species classifier checkpoint; use the species.pt that "
                            "train_species_classifier wrote")
        cfg = copy.deepcopy(state["config"])
        cfg["model"].update(pretrained=False, weights=None)  # every weight is in the checkpoint
        model = SpeciesModel(build_model(cfg), len(state["classes"]))
        model.load_state_dict(state["model"])
        pre, crop_cfg = state["preprocessing"], state["crop"]
        return cls(model, state["classes"], pre["image_size"], pre["mean"], pre["std"],
                   state["threshold"] if threshold is None else threshold, crop_cfg["padding"], crop_cfg["square"],
                   device)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """The network input of an RGB uint8 crop."""
        return self.transform(image=image)["image"]

    def forward(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Softmax over the classes, (N, classes), of preprocessed crops."""
        if not len(tensors):
            return np.zeros((0, len(self.classes)), np.float32)
        with torch.inference_mode():
            return self.model(torch.stack(list(tensors)).to(self.device)).float().softmax(1).cpu().numpy()

    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Softmax over the classes, (N, classes), for RGB uint8 crops."""
        chunks = [self.forward([self.preprocess(image) for image in images[start:start + batch_size]])
                  for start in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)

    def decide(self, probabilities: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(species, score) per row of probabilities; "unknown" where the best score is below the threshold."""
        best, scores = probabilities.argmax(1), probabilities.max(1)
        return [self.classes[i] if s >= self.threshold else UNKNOWN for i, s in zip(best, scores)], scores

    def cut(self, image: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
        """The crop of `box` (normalised xywh; None: the whole image) as the classifier was trained on."""
        return image if box is None else crop(image, box, self.padding, self.square)[0]

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 32) -> tuple[list[str], np.ndarray]:
        """(species, score) per crop; species is "unknown" where the best score is below the threshold."""
        return self.decide(self.probabilities(images, batch_size))

    def species_for(self, file: str, bbox: tuple[float, float, float, float] | None = None) -> tuple[str, float]:
        """The species in `bbox` (normalised xywh; None: whole image) of an image file, cropped as in training."""
        species, scores = self.predict([self.cut(read_image(file), bbox)])
        return species[0], float(scores[0])
