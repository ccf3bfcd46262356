"""Embedding images with a model: batches from a DataLoader, flip views averaged."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reid.embedding.tta import views


@torch.no_grad()
def embed_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device, tta: str = "none") -> torch.Tensor:
    """L2-normalised embeddings of one batch: the mean of its TTA views, normalised again."""
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    total = None
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        for view in views(images, tta):
            out = model(view).float()
            total = out if total is None else total + out
    return F.normalize(total, dim=1).cpu()


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                       num_workers: int = 0, progress: bool = False, desc: str = "embedding",
                       tta: str = "none") -> np.ndarray:
    """L2-normalised float32 embeddings, one row per dataset item, in dataset order."""
    was_training = model.training
    model.eval()
    # A private generator keeps the loader from drawing on the global RNG, which exact resume restores.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    chunks = [embed_batch(model, images, device, tta)
              for images, _labels, _index in tqdm(loader, desc=desc, disable=None if progress else True, leave=False)]
    model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()
