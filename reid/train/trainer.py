"""Training one fold: PK batches, ArcFace + triplet, LLRD, validation mAP each epoch, exact resume.

Exact resume rests on three facts: the sampler derives every batch and every augmentation seed
from (seed, epoch) alone; data loaders draw on private generators, never the global RNG; and
`last.pt` stores every other piece of mutable state, including RNG states and the position
within the epoch. Resuming from it replays the rest of the run bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from reid.data import classes
from reid.data.dataset import ReIDDataset
from reid.data.mixing import context_swap
from reid.data.samplers import PKSampler
from reid.data.splits import encounter_ids
from reid.data.transforms import Augmentation, build_transforms, use_hflip
from reid.embedding import compute_embeddings
from reid.embedding.compute import loader_workers
from reid.errors import ConfigError, ReidError
from reid.evaluation.metrics import retrieval_metrics
from reid.io import write_json, write_jsonl
from reid.model.build import build_model, preprocessing
from reid.model.whitening import PooledFeatures, check_settings as check_whitening, learned_whitening, load_into_neck
from reid.reproducibility import rng_state, seed_everything, set_rng_state
from reid.train import distributed
from reid.checkpoint import inference_record, load_checkpoint, load_matching, save_checkpoint
from reid.train.curves import run_figure, save_figure
from reid.train.diagnostics import probe_rows, run_warnings
from reid.train.early_stopping import EarlyStopping
from reid.train.losses import ReIDLoss, TrainStep
from reid.train.optim import backbone_layer_ids, build_optimizer, build_scheduler, param_groups

CURVES_EVERY_S = 30.0  # a training run redraws RUN/curves.png at most this often, and when it ends


class _EpochBatches:
    """A batch sampler whose batches are replaced each epoch, so loader workers (and their image
    caches) persist across epochs."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def refuse_existing_run(out: Path, resume: bool) -> None:
    """A run over one that exists needs --resume; checked before anything (run.json, split.csv) is written."""
    if not resume and ((out / "last.pt").exists() or (out / "summary.json").exists()):
        raise ReidError(f"'{out}' already holds a run; pass --resume to continue it, or choose another --out")


class FoldTrainer:
    def __init__(self, cfg: dict, table: pd.DataFrame, train_idx: np.ndarray, val_idx: np.ndarray,
                 out_dir: str | Path, progress: bool = True, log_prefix: str = ""):
        self.cfg, self.table, self.out = cfg, table, Path(out_dir)
        self.log_prefix = log_prefix  # folds trained side by side interleave their lines
        self._curves_drawn = -math.inf  # time.monotonic() of the last curves.png
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.ctx = distributed.init()
        self.progress = progress and self.ctx.is_main
        tcfg = cfg["train"]
        if tcfg["monitor"] not in ("mAP", "identity_balanced_mAP", "top1"):
            raise ConfigError(f"train.monitor '{tcfg['monitor']}': use mAP, identity_balanced_mAP or top1")

        seed_everything(cfg["seed"])
        # channels-last convolutions run ~1.5x faster on CPU and use tensor cores on GPU
        self.model = build_model(cfg).to(self.ctx.device, memory_format=torch.channels_last)
        self.mean, self.std = preprocessing(self.model)
        if tcfg["whitening"]:
            check_whitening(cfg["model"]["embedding_dim"], self.model.backbone.num_features,
                            float(tcfg["whitening_shrink"]))
        dcfg = cfg["data"]
        size = dcfg["image_size"]
        self.hflip, hflip_reason = use_hflip(dcfg["hflip"], table)
        self.log(f"horizontal flip augmentation {'on' if self.hflip else 'off'}: {hflip_reason}")

        train_table = table.iloc[self.train_idx]
        self.class_mode, class_reason = classes.resolve_mode(cfg["loss"]["classes"], train_table)
        self.log(f"training classes: {class_reason}")
        self.identities, labels = classes.encode(classes.class_keys(train_table, self.class_mode))
        self.train_set = ReIDDataset(train_table["path"].tolist(), labels,
                                     build_transforms(size, self.mean, self.std, train=True, hflip=self.hflip,
                                                      augmentation=Augmentation.from_config(dcfg)),
                                     cache_images=dcfg["cache_images"], cache_size=int(size * 1.15))
        # every row of the table, as validation and embedding see it (decoded once when images are cached)
        self.eval_set = ReIDDataset(table["path"].tolist(), np.zeros(len(table), dtype=np.int64),
                                    build_transforms(size, self.mean, self.std, train=False, hflip=False),
                                    cache_images=dcfg["cache_images"], cache_size=int(size * 1.15))
        self.swap_p, self.swap_keep = float(dcfg["context_swap_p"]), float(dcfg["context_swap_keep"])
        if not (0 <= self.swap_p <= 1 and 0.05 <= self.swap_keep <= 1):
            raise ConfigError(f"data.context_swap_p is {self.swap_p} and data.context_swap_keep {self.swap_keep}; "
                              "they must lie in [0, 1] and [0.05, 1]")
        # the viewpoint of each row when flanks are named: validation then splits its scores by flank
        self.views = classes.named_viewpoints(table).to_numpy() if classes.flank_count(table) > 1 else None
        scfg = cfg["sampler"]
        self.sampler = PKSampler(labels, scfg["p"], scfg["k"], cfg["seed"], scfg["batches_per_epoch"],
                                 scfg["min_batches_per_epoch"])
        self.images_per_batch = scfg["p"] * scfg["k"]

        self.loss = ReIDLoss(len(self.identities), cfg["model"]["embedding_dim"], cfg["loss"]).to(self.ctx.device)
        self.step_module = TrainStep(self.model, self.loss)
        groups = param_groups(self.model.backbone, [self.model.pool, self.model.neck, self.loss], tcfg)
        self.optimizer = build_optimizer(groups)
        self.accum = max(1, int(tcfg["grad_accum"]))
        self.batches_per_epoch = len(self.sampler.for_epoch(0, rank=self.ctx.rank, world_size=self.ctx.world_size))
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.accum)
        self.scheduler = build_scheduler(self.optimizer, tcfg["epochs"] * steps_per_epoch,
                                         int(tcfg["warmup_epochs"] * steps_per_epoch))
        self.amp = bool(tcfg["amp"]) and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.stopper = EarlyStopping(tcfg["patience"], tcfg["min_delta"])
        self.ema = ModelEmaV3(self.model, decay=float(tcfg["ema_decay"])) if tcfg["ema_decay"] > 0 else None
        self.frozen = self._frozen_parameters(int(tcfg["frozen_layers"]))
        self.probe_idx = probe_rows(table, self.train_idx, int(cfg["eval"]["train_probe_images"]), cfg["seed"])
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        # this epoch's sums so far: a mid-epoch resume reports the same epoch loss
        self.loss_sum, self.part_sums = 0.0, {}

    def _frozen_parameters(self, layers: int) -> list[torch.nn.Parameter]:
        """The backbone's parameters in its `layers` lowest layer groups (stem, first stages or blocks)."""
        if layers < 0:
            raise ConfigError(f"train.frozen_layers is {layers}; use 0 (nothing frozen) or more")
        layer_of = backbone_layer_ids(self.model.backbone)
        return [param for name, param in self.model.backbone.named_parameters() if layer_of[name] < layers]

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation scores and best.pt keeps: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------ state
    def log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(self.log_prefix + message)

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def resume_state(self) -> dict:
        """last.pt: the inference record of the training weights, and all an exact resume needs."""
        return self._record(
            self.model, loss=self.loss.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            early_stopping=self.stopper.state_dict(), rng=distributed.gather(rng_state(), self.ctx),
            epoch=self.epoch, batch=self.batch, step=self.step, history=self.history, loss_sum=self.loss_sum,
            loss_part_sums=self.part_sums, ema=self.ema.state_dict() if self.ema is not None else None,
            world_size=self.ctx.world_size)

    def _record(self, model: torch.nn.Module, **extra) -> dict:
        return inference_record(model.state_dict(), self.cfg, self.mean, self.std, self.identities, self.class_mode,
                                **extra)

    def save_last(self) -> None:
        state = self.resume_state()  # every rank takes part in gathering RNG states
        if self.ctx.is_main:
            save_checkpoint(self.last_path, state)
            # metrics.jsonl is rewritten from the checkpoint's history, so the two never disagree
            write_jsonl(self.out / "metrics.jsonl", self.history)
            self.draw_curves(final=False)
        distributed.barrier(self.ctx)

    def draw_curves(self, final: bool) -> None:
        """RUN/curves.png from the history: when the run ends, and while it trains at most every
        `CURVES_EVERY_S` (drawing it took 0.3 s, 5% of a cpu-small epoch, when done every epoch)."""
        now = time.monotonic()
        if not self.history or (not final and now - self._curves_drawn < CURVES_EVERY_S):
            return
        save_figure(run_figure(self.history, title=str(self.out)), self.out / "curves.png")
        self._curves_drawn = now

    def restore(self) -> None:
        state = load_checkpoint(self.last_path)
        if state.get("world_size", 1) != self.ctx.world_size:
            raise ReidError(f"{self.last_path} was written by {state.get('world_size', 1)} processes; "
                            f"resume with the same number (now {self.ctx.world_size})")
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.epoch, self.batch, self.step, self.history = state["epoch"], state["batch"], state["step"], state["history"]
        self.loss_sum, self.part_sums = state["loss_sum"], state["loss_part_sums"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"][self.ctx.rank])
        self.log(f"resumed {self.last_path} at epoch {self.epoch + 1}, batch {self.batch}")

    def init_from(self, path: str | Path) -> None:
        state = load_checkpoint(path)
        skipped = load_matching(self.model, state["model"]) + load_matching(self.loss, state.get("loss", {}))
        self.log(f"initialised from {path}" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))

    # --------------------------------------------------------------- training
    def fit(self, resume: bool = False) -> dict:
        summary_path = self.out / "summary.json"
        if resume and summary_path.exists():
            self.log(f"{self.out} already finished; nothing to resume")
            return json.loads(summary_path.read_text())
        refuse_existing_run(self.out, resume)
        if resume and self.last_path.exists():
            self.restore()
        elif self.cfg["train"]["init_from"]:
            self.init_from(self.cfg["train"]["init_from"])
            if self.ema is not None:
                self.ema.set(self.model)

        net = self.step_module
        if self.ctx.distributed:
            net = DistributedDataParallel(self.step_module, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None)
        batches = _EpochBatches()
        nw = self.cfg["data"]["num_workers"]
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=nw, persistent_workers=nw > 0,
                            pin_memory=self.ctx.device.type == "cuda", generator=torch.Generator())
        epochs = self.cfg["train"]["epochs"]
        if epochs == 0 and not self.history:  # score the backbone as it is, untrained
            self._record_epoch({}, distributed.broadcast(self.evaluate() if self.ctx.is_main else None, self.ctx))
            self.save_last()
        while self.epoch < epochs and not self.stopper.should_stop:
            batches.batches = self.sampler.for_epoch(self.epoch, start_batch=self.batch, rank=self.ctx.rank,
                                                     world_size=self.ctx.world_size)
            self._apply_freezing()
            train_stats = self._train_epoch(net, loader)
            scores = distributed.broadcast(self.evaluate() if self.ctx.is_main else None, self.ctx)
            self._end_epoch(train_stats, scores)
        if self.ctx.is_main:
            self.draw_curves(final=True)
        monitor = self.cfg["train"]["monitor"]
        best_metrics = next((h["val"] for h in self.history if h["epoch"] == self.stopper.best_epoch), None)
        whitening = self.fit_whitening() if self.cfg["train"]["whitening"] else None
        summary = {"best_epoch": self.stopper.best_epoch, "best_score": self.stopper.best_score,
                   "monitor": monitor, "epochs_run": self.epoch,
                   "stopped_early": self.stopper.should_stop,
                   "best_metrics": whitening["after"] if whitening else best_metrics,
                   "whitening": whitening,
                   "warnings": run_warnings(self.history, self.stopper.best_epoch, monitor)}
        for warning in summary["warnings"]:
            self.log(f"warning: {warning}")
        if self.ctx.is_main:
            write_json(summary_path, summary)
        distributed.barrier(self.ctx)
        return summary

    def fit_whitening(self) -> dict:
        """Replace best.pt's neck by the learned whitening of its pooled features on the training images
        (reid/model/whitening.py); returns held-out metrics before and after. Run again (a resume), it
        fits the same projection: the features it is fitted to come before the neck."""
        best_path = self.out / "best.pt"
        best = load_checkpoint(best_path)
        self.eval_model.load_state_dict(best["model"])
        before = best.get("whitening", {}).get("before", best["metrics"])
        whitening = None
        if self.ctx.is_main:
            features = self.embed(self.train_idx, "fitting whitening", PooledFeatures(self.eval_model),
                                  normalize=False)
            identities = self.table["identity"].to_numpy()[self.train_idx]
            mean, projection = learned_whitening(features, identities, self.cfg["model"]["embedding_dim"],
                                                 float(self.cfg["train"]["whitening_shrink"]))
            load_into_neck(self.eval_model.neck, mean, projection)
            after = self.validate()
            self.log(f"learned whitening on {len(self.train_idx)} training images of {len(set(identities))} "
                     f"individuals: val mAP {before['mAP']:.3f} -> {after['mAP']:.3f}, top1 {before['top1']:.3f} -> "
                     f"{after['top1']:.3f}")
            whitening = {"before": before, "after": after, "images": len(self.train_idx),
                         "shrink": float(self.cfg["train"]["whitening_shrink"])}
            save_checkpoint(best_path, {**best, "model": self.eval_model.state_dict(), "metrics": after,
                                        "whitening": whitening})
        return distributed.broadcast(whitening if self.ctx.is_main else None, self.ctx)

    def _apply_freezing(self) -> None:
        """Freeze the lowest layer groups during the first `train.frozen_epochs` epochs (a function of
        the epoch alone, so a resumed run freezes exactly as the original did)."""
        frozen_epochs = int(self.cfg["train"]["frozen_epochs"])
        frozen = bool(self.frozen) and (frozen_epochs == 0 or self.epoch < frozen_epochs)
        for param in self.frozen:
            param.requires_grad_(not frozen)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg["train"]["freeze_bn"]:
            # pretrained statistics stay: a few hundred photos in batches of 64 estimate them worse
            for module in self.model.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _learning_rates(self) -> dict:
        """Current LR of the lowest and highest backbone groups and of the head."""
        backbone = [g for g in self.optimizer.param_groups if g["name"].startswith("backbone_")]
        head = [g for g in self.optimizer.param_groups if g["name"].startswith("head_")]
        out = {}
        if backbone:
            out["backbone_bottom"] = min(backbone, key=lambda g: g["name"])["lr"]
            out["backbone_top"] = max(backbone, key=lambda g: g["name"])["lr"]
        if head:
            out["head"] = head[0]["lr"]
        return out

    def _swap_context(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Context swap (reid/data/mixing.py), drawn from (seed, epoch, batch) alone so a resume replays it."""
        if self.swap_p <= 0:
            return images
        generator = torch.Generator().manual_seed(hash((self.cfg["seed"], self.epoch, self.batch)) & (2 ** 62))
        return context_swap(images, labels, self.swap_p, generator, self.swap_keep)

    def _train_epoch(self, net: torch.nn.Module, loader: DataLoader) -> dict:
        self._set_train_mode()
        device, every = self.ctx.device, self.cfg["train"]["checkpoint_every"]
        bar = tqdm(total=self.batches_per_epoch, initial=self.batch, disable=None if self.progress else True, leave=False,
                   desc=f"epoch {self.epoch + 1}/{self.cfg['train']['epochs']}", unit="batch")
        resumed_at, started = self.batch, time.perf_counter()
        for images, labels, _index in loader:
            boundary = (self.batch + 1) % self.accum == 0 or self.batch + 1 == self.batches_per_epoch
            sync = boundary or not isinstance(net, DistributedDataParallel)
            with contextlib.nullcontext() if sync else net.no_sync():
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
                    images = self._swap_context(images, labels)
                    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                    loss, parts = net(images, labels.to(device, non_blocking=True))
                self.scaler.scale(loss / self.accum).backward()
            self.batch += 1
            self.loss_sum += loss.item()
            for name, value in parts.items():
                self.part_sums[name] = self.part_sums.get(name, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{self.loss_sum / self.batch:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
            if boundary:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.model, step=self.step)
                if every and self.step % every == 0 and self.batch < self.batches_per_epoch:
                    self.save_last()
        bar.close()
        seconds = time.perf_counter() - started
        n = self.batch - resumed_at
        batches = max(self.batch, 1)
        return {"loss": self.loss_sum / batches,
                "loss_parts": {name: total / batches for name, total in self.part_sums.items()},
                "seconds": round(seconds, 3),
                "images_per_s": round(n * self.images_per_batch * self.ctx.world_size / max(seconds, 1e-9), 2)}

    def embed(self, rows: np.ndarray, desc: str, model: torch.nn.Module | None = None,
              normalize: bool = True) -> np.ndarray:
        """Embeddings of the table's `rows` with the eval transform, by `model` (default: the evaluated weights)."""
        return compute_embeddings(model or self.eval_model, Subset(self.eval_set, rows.tolist()),
                                  self.cfg["eval"]["batch_size"], self.ctx.device,
                                  loader_workers(self.ctx.device, self.cfg["data"]["num_workers"]),
                                  progress=self.progress, desc=desc, normalize=normalize)

    @property
    def gallery_idx(self) -> np.ndarray:
        """In a `closed` split the held-out individuals are known, so the gallery is the training
        images plus the other held-out ones; in a `disjoint` split it is the held-out images only."""
        closed = self.cfg["cv"]["split"] == "closed"
        return np.concatenate([self.train_idx, self.val_idx]) if closed else self.val_idx

    def embed_rows(self, *row_sets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Embed the union of `row_sets` once (a closed split's gallery holds the training probe);
        returns the lookup from rows to their embeddings."""
        rows = np.unique(np.concatenate(row_sets))
        emb = self.embed(rows, desc="validating")
        return lambda wanted: emb[np.searchsorted(rows, wanted)]

    def validate(self, embedded: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
        """Retrieval metrics of the held-out images against `gallery_idx`; a query never scores its own
        encounter. With named flanks, `same_flank` and `cross_flank` split the scores by viewpoint."""
        gallery_idx = self.gallery_idx
        embedded = embedded or self.embed_rows(self.val_idx, gallery_idx)
        ids, groups = self.table["identity"].to_numpy(), encounter_ids(self.table)
        views = self.views
        return retrieval_metrics(embedded(self.val_idx), ids[self.val_idx], embedded(gallery_idx), ids[gallery_idx],
                                 query_groups=groups[self.val_idx], gallery_groups=groups[gallery_idx],
                                 query_views=None if views is None else views[self.val_idx],
                                 gallery_views=None if views is None else views[gallery_idx])

    def probe(self, embedded: Callable[[np.ndarray], np.ndarray]) -> dict:
        """The same retrieval metrics on the fixed sample of training images, among themselves."""
        if not len(self.probe_idx):
            return {}
        emb = embedded(self.probe_idx)
        ids, groups = self.table["identity"].to_numpy()[self.probe_idx], encounter_ids(self.table)[self.probe_idx]
        metrics = retrieval_metrics(emb, ids, emb, ids, groups, groups, same_set=True)
        return {key: metrics[key] for key in ("mAP", "top1", "queries")}

    def evaluate(self) -> dict:
        self.eval_model.eval()
        embedded = self.embed_rows(self.val_idx, self.gallery_idx, self.probe_idx)
        return {"val": self.validate(embedded), "train_probe": self.probe(embedded)}

    def _record_epoch(self, train_stats: dict, scores: dict) -> None:
        """Log the epoch, update early stopping, keep best.pt when it is the best so far."""
        metrics, probe = scores["val"], scores["train_probe"]
        improved = self.stopper.update(metrics[self.cfg["train"]["monitor"]], self.epoch)
        row = {"epoch": self.epoch, **{f"train_{k}": v for k, v in train_stats.items()},
               "lr": self._learning_rates(), "gem_p": float(self.model.pool.p.detach()),
               "train_probe": probe, "val": metrics, "best": improved}
        self.history.append(row)
        trained = "untrained: "
        if train_stats:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in train_stats["loss_parts"].items())
            trained = f"loss {train_stats['loss']:.3f} ({parts})  "
        probe_text = f"train-probe mAP {probe['mAP']:.3f}  " if probe else ""
        speed = f"  ({train_stats['images_per_s']:.0f} img/s)" if train_stats else ""
        self.log(f"epoch {self.epoch + 1}: {trained}{probe_text}val mAP {metrics['mAP']:.3f}  top1 {metrics['top1']:.3f}"
                 f"{speed}" + ("  *best*" if improved else f"  patience left {self.stopper.patience_left}"
                                if self.stopper.patience else ""))
        if improved and self.ctx.is_main:
            save_checkpoint(self.out / "best.pt", self._record(self.eval_model, loss=self.loss.state_dict(),
                                                              epoch=self.epoch, metrics=metrics))

    def _end_epoch(self, train_stats: dict, scores: dict) -> None:
        self._record_epoch(train_stats, scores)
        self.epoch, self.batch, self.loss_sum, self.part_sums = self.epoch + 1, 0, 0.0, {}
        self.save_last()
