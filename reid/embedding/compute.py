"""Embedding images with a model: batches from a DataLoader, flip views averaged."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reid.embedding.tta import TTA_VIEWS, views

T = TypeVar("T")
PixelStats = tuple[Sequence[float], Sequence[float]]  # the (mean, std) of 0..1 pixels a model was trained on


def normalize_pixels(images: torch.Tensor, pixels: PixelStats) -> torch.Tensor:
    """A uint8 RGB batch (N, 3, H, W) as float32 normalised with `pixels`, in place on its float copy.
    The ONNX export (reid/export/onnx.py) traces this very function into its graph."""
    mean, std = (torch.tensor([255.0 * v for v in stats], device=images.device).view(1, -1, 1, 1)
                 for stats in pixels)
    return images.float().sub_(mean).div_(std)


def model_input(images: torch.Tensor, device: torch.device, pixels: PixelStats | None = None,
                memory_format: torch.memory_format = torch.channels_last,
                model_normalizes: bool = False) -> torch.Tensor:
    """A batch as the model takes it: on `device`, in `memory_format`. A uint8 batch (the embedder's
    transform stops before normalising: a quarter of the bytes to collate, move and flip) is
    normalised here with `pixels`, unless the model normalises its input itself (`model_normalizes`,
    an ONNX export, whose graph does it on ONNX Runtime's threads)."""
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    if images.dtype != torch.uint8 or model_normalizes:
        return images
    if pixels is None:
        raise ValueError("a uint8 image batch needs the model's pixel mean and std to be normalised")
    return normalize_pixels(images, pixels)


def loader_workers(device: torch.device, configured: int) -> int:
    """DataLoader workers for embedding on `device`: `configured` beside an accelerator, none on the
    CPU. There the model's threads take every core, and decoding processes beside them stall each of
    its parallel layers for longer than the decoding they take over (scripts/bench_embed.py, 2 cores:
    ONNX Runtime at 0.64 of its bare forward with 2 workers, 0.92-0.96 with none and
    decoding one batch ahead in a thread)."""
    return int(configured) if device.type != "cpu" else 0


def decoded_ahead(batches: Iterable[T]) -> Iterator[T]:
    """`batches` in order, each produced by a background thread while the caller works on the one
    before. Without loader workers this overlaps decoding (PIL and libjpeg release the GIL) with the
    model's forward, which idles cores between its parallel layers; one batch ahead bounds memory.
    An error raised while producing a batch is raised here, in order; a consumer that stops early
    stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                if not _put(ready, (batch, None), stop):
                    return
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            _put(ready, (done, error), stop)
            return
        _put(ready, (done, None), stop)

    worker = threading.Thread(target=produce, name="decode-ahead", daemon=True)
    worker.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is done:
                return
            yield batch
    finally:
        stop.set()
        worker.join()


def _put(ready: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Queue `item` unless the consumer stopped; False if it did."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


@torch.no_grad()
def embed_batch(model: torch.nn.Module, images: torch.Tensor, device: torch.device, tta: str = "none",
                normalize: bool = True, pixels: PixelStats | None = None) -> torch.Tensor:
    """L2-normalised embeddings of one batch: the mean of its TTA views, normalised again (with
    `normalize` off: the model's outputs as they are, e.g. pooled features a neck is fitted to).
    A uint8 batch is normalised with `pixels` first (`model_input`) unless the model declares
    `normalizes_input`, in the memory format the model declares as `input_memory_format`
    (channels-last, which suits PyTorch's CPU convolutions, if none)."""
    images = model_input(images, device, pixels, getattr(model, "input_memory_format", torch.channels_last),
                         getattr(model, "normalizes_input", False))
    total = None
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        for view in views(images, tta):
            out = model(view).float()
            total = out if total is None else total + out
    return (F.normalize(total, dim=1) if normalize else total / len(TTA_VIEWS[tta])).cpu()


def iter_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                    num_workers: int = 0, tta: str = "none", normalize: bool = True,
                    pixels: PixelStats | None = None) -> Iterator[torch.Tensor]:
    """L2-normalised embeddings batch by batch, in dataset order, from one DataLoader: its workers (or,
    without workers, one thread) keep decoding the next batches while the model runs, however the
    caller groups the results."""
    was_training = model.training
    model.eval()
    # A private generator keeps the loader from drawing on the global RNG, which exact resume restores.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    try:
        batches = loader if num_workers else decoded_ahead(loader)
        for images, _labels, _index in batches:
            yield embed_batch(model, images, device, tta, normalize, pixels)
    finally:
        model.train(was_training)


def compute_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                       num_workers: int = 0, progress: bool = False, desc: str = "embedding",
                       tta: str = "none", normalize: bool = True, pixels: PixelStats | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings (unless `normalize` is off), one row per dataset item, in dataset order."""
    batches = iter_embeddings(model, dataset, batch_size, device, num_workers, tta, normalize, pixels)
    chunks = list(tqdm(batches, desc=desc, total=-(-len(dataset) // batch_size),
                       disable=None if progress else True, leave=False))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()
