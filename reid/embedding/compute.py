"""Embedding images with a model: batches from a DataLoader, flip views averaged."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reid.embedding.tta import TTA_VIEWS, views


@torch.no_grad()
def embed_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device, tta: str = "none",
                normalize: bool = True) -> torch.Tensor:
    """L2-normalised embeddings of one batch: the mean of its TTA views, normalised again (with
    `normalize` off: the model's outputs as they are, e.g. pooled features a neck is fitted to)."""
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    total = None
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        for view in views(images, tta):
            out = model(view).float()
            total = out if total is None else total + out
    return (F.normalize(total, dim=1) if normalize else total / len(TTA_VIEWS[tta])).cpu()


def iter_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                    num_workers: int = 0, tta: str = "none", normalize: bool = True) -> Iterator[torch.Tensor]:
    """L2-normalised embeddings batch by batch, in dataset order, from one DataLoader: its workers
    keep decoding the next batches while the model runs, however the caller groups the results."""
    was_training = model.training
    model.eval()
    # A private generator keeps the loader from drawing on the global RNG, which exact resume restores.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    try:
        for images, _labels, _index in loader:
            yield embed_batch(model, images, device, tta, normalize)
    finally:
        model.train(was_training)


def compute_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                       num_workers: int = 0, progress: bool = False, desc: str = "embedding",
                       tta: str = "none", normalize: bool = True) -> np.ndarray:
    """L2-normalised float32 embeddings (unless `normalize` is off), one row per dataset item, in dataset order."""
    batches = iter_embeddings(model, dataset, batch_size, device, num_workers, tta, normalize)
    chunks = list(tqdm(batches, desc=desc, total=-(-len(dataset) // batch_size),
                       disable=None if progress else True, leave=False))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()
