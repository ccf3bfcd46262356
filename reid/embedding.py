"""Embedding images with a trained model."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def compute_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                       num_workers: int = 0, progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """L2-normalised float32 embeddings, one row per dataset item, in dataset order."""
    was_training = model.training
    model.eval()
    # A private generator keeps the loader from drawing on the global RNG, which exact resume restores.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    chunks = []
    for images, _labels, _index in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            chunks.append(model(images.to(device, non_blocking=True, memory_format=torch.channels_last)).float().cpu())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()
