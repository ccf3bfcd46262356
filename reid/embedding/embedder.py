"""A trained model ready to embed photos: weights, preprocessing and TTA from one checkpoint (or
its ONNX export, run by ONNX Runtime behind the same preprocessing and TTA).

Its `fingerprint` names exactly what produces the vectors (weights, preprocessing, TTA), so a
cache never mixes vectors of two models. An ONNX export has its checkpoint's fingerprint: the same
weights give the same vectors, to float rounding (reid/export/onnx_format.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from reid.data.dataset import ReIDDataset
from reid.data.transforms import build_transforms
from reid.embedding.compute import compute_embeddings, embed_batch, iter_embeddings, loader_workers
from reid.embedding.onnx_runtime import OnnxModel, is_onnx, load_onnx
from reid.embedding.tta import check_tta
from reid.identify.decision import stored_thresholds
from reid.model.build import ReIDModel
from reid.checkpoint import inference_model, load_inference


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors themselves: metadata added to the checkpoint file later does not change it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_model(path: str | Path) -> None:
    """ReidError unless `Embedder.from_checkpoint` can load `path`: a checkpoint, or an ONNX export."""
    if is_onnx(path):
        load_onnx(path, threads=1)
    else:
        load_inference(path)


class Embedder:
    def __init__(self, model: ReIDModel | OnnxModel, image_size: int, mean: Sequence[float], std: Sequence[float],
                 tta: str = "none", batch_size: int = 64, num_workers: int = 0,
                 device: torch.device | None = None, weights_hash: str | None = None,
                 thresholds: dict | None = None, postprocessing: dict | None = None):
        self.device = device or default_device()
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.tta = check_tta(tta)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        # uint8 out of the workers, normalised a batch at a time (reid.embedding.compute.model_input)
        self.transform = build_transforms(self.image_size, self.mean, self.std, train=False, hflip=False,
                                          normalize=False)
        self.weights_hash = weights_hash or weights_fingerprint(model.state_dict())
        self.embedding_dim = int(model.embedding_dim)
        self.thresholds = thresholds  # calibrated by `reid calibrate`, else None
        self.postprocessing = postprocessing  # TTA and re-ranking chosen by `reid calibrate`, else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, tta: str | None = None, batch_size: int | None = None,
                        num_workers: int | None = None, device: torch.device | None = None,
                        side_by_side: bool = False) -> "Embedder":
        """The model of a training checkpoint (best.pt or last.pt), built offline from its config, or of
        its ONNX export (`reid export`, a `.onnx` path), run by ONNX Runtime on the CPU whatever `device`.

        `tta` None takes the TTA `reid calibrate` chose for the checkpoint (none when uncalibrated).
        `side_by_side` (batch jobs over many photos) runs an ONNX export one single-threaded batch a
        core (`load_onnx`'s streams); off, one batch takes every core, as a lone photo in a service
        needs. PyTorch models ignore it: torch's threads are one setting for the whole process."""
        if is_onnx(path):
            # the export's metadata is the checkpoint's record without the weights, but with their hash;
            # loader workers decode instead of the streams' threads, so with them one batch takes every core
            streams = torch.get_num_threads() if side_by_side and not num_workers else 1
            model, state = load_onnx(path, streams=streams)
            return cls.from_record(model, state, state["weights_sha256"], tta, batch_size, num_workers,
                                   torch.device("cpu"))
        state = load_inference(path)
        return cls.from_record(inference_model(state), state, weights_fingerprint(state["model"]), tta, batch_size,
                               num_workers, device)

    @classmethod
    def from_record(cls, model: ReIDModel | OnnxModel, state: dict, weights_hash: str, tta: str | None = None,
                    batch_size: int | None = None, num_workers: int | None = None,
                    device: torch.device | None = None) -> "Embedder":
        """`model` with the preprocessing, TTA, batch size and calibration of its checkpoint's record."""
        cfg, pre, post = state["config"], state["preprocessing"], state.get("postprocessing")
        if tta is None:
            tta = post["tta"] if post else "none"
        device = device or default_device()
        return cls(model, pre["image_size"], pre["mean"], pre["std"], tta,
                   batch_size or cfg["eval"]["batch_size"],
                   loader_workers(device, cfg["data"]["num_workers"]) if num_workers is None else num_workers,
                   device, weights_hash, stored_thresholds(state.get("calibration")), post)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines a vector: weights, preprocessing, TTA."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def draft_size(self) -> int:
        """Whole photos decode at a reduced JPEG scale still this size on each side, then shrink
        (area-averaged) to the input: twice the input keeps thin stripes, as the service decodes."""
        return 2 * self.image_size

    @property
    def pixels(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) that normalise this model's uint8 input batches."""
        return self.mean, self.std

    def describe(self) -> dict:
        return {"weights_sha256": self.weights_hash, "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std), "tta": self.tta, "embedding_dim": self.embedding_dim,
                "jpeg_draft": self.draft_size}

    def _dataset(self, paths: Sequence[str]) -> ReIDDataset:
        return ReIDDataset(list(paths), np.zeros(len(paths), dtype=np.int64), self.transform,
                           draft_size=self.draft_size)

    def embed_paths(self, paths: Sequence[str], progress: bool = False, desc: str = "embedding") -> np.ndarray:
        """(len(paths), dim) float32, L2-normalised; workers decode while the model runs."""
        emb = compute_embeddings(self.model, self._dataset(paths), self.batch_size, self.device, self.num_workers,
                                 progress=progress, desc=desc, tta=self.tta, pixels=self.pixels)
        return emb.reshape(len(paths), self.embedding_dim)

    def iter_paths(self, paths: Sequence[str]) -> Iterator[np.ndarray]:
        """Embeddings of `paths` batch by batch, in order, from one loader (for chunked writers)."""
        for batch in iter_embeddings(self.model, self._dataset(paths), self.batch_size, self.device,
                                     self.num_workers, self.tta, pixels=self.pixels):
            yield batch.numpy()

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings of decoded RGB uint8 images (a service's uploads), in one batch."""
        if not images:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        batch = torch.stack([self.transform(image=image)["image"] for image in images])
        return embed_batch(self.model, batch, self.device, self.tta, pixels=self.pixels).numpy()
