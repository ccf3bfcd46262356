"""Embedding images with a model: batches decoded while the model runs, flip views averaged."""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
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
    """L2-normalised embeddings batch by batch, in dataset order, however the caller groups the
    results. Loader workers (or, without workers, one thread) keep decoding the next batches while
    the model runs; a model that declares `streams` > 1 (an ONNX export loaded for batch jobs) runs
    that many batches side by side instead, each decoded and embedded by its own thread."""
    was_training = model.training
    model.eval()
    try:
        streams = model_streams(model)
        if streams > 1 and not num_workers:
            yield from _side_by_side(model, dataset, stream_batch_size(batch_size, streams), device, tta,
                                     normalize, pixels, streams)
            return
        # A private generator keeps the loader from drawing on the global RNG, which exact resume restores.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator())
        batches = loader if num_workers else decoded_ahead(loader)
        for images, _labels, _index in batches:
            yield embed_batch(model, images, device, tta, normalize, pixels)
    finally:
        model.train(was_training)


def model_streams(model: torch.nn.Module) -> int:
    """How many batches `model` runs side by side (an ONNX export loaded for batch jobs), else 1."""
    return int(getattr(model, "streams", 1))


def stream_batch_size(batch_size: int, streams: int) -> int:
    """Each of `streams` batches side by side holds this share of `batch_size` photos: as much
    memory as one batch in all, and a working set a core's caches hold better (2 cores, ONNX
    Runtime, MobileNetV2 at 256 px: 2 x 32 photos side by side 224 img/s, one 64-photo batch on both
    cores 217, 2 x 64 side by side 214)."""
    return max(1, -(-batch_size // streams))


def _side_by_side(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device, tta: str,
                  normalize: bool, pixels: PixelStats | None, streams: int) -> Iterator[torch.Tensor]:
    """Embeddings of consecutive batches of at most `batch_size`, in order, each decoded and embedded
    by one of `streams` threads. With one single-threaded model run a core, a thread that decodes
    delays only its own batch: no core idles at a parallel layer's barrier meanwhile. The batches
    are of near-equal sizes and a multiple of `streams` in number, so no stream idles at the end while
    another finishes a full batch. Twice `streams` batches are queued at most (bounded memory, and a
    thread done early starts the next at once); an error is raised in order; a consumer that stops
    early cancels what has not started."""
    # never more batches than photos: an empty batch would not collate
    count = min(len(dataset), streams * -(-len(dataset) // (batch_size * streams)))
    bounds = np.linspace(0, len(dataset), count + 1).round().astype(int)
    ranges = iter(zip(bounds[:-1].tolist(), bounds[1:].tolist()))

    def embed(rows: tuple[int, int]) -> torch.Tensor:
        images, _labels, _index = default_collate([dataset[i] for i in range(*rows)])
        return embed_batch(model, images, device, tta, normalize, pixels)

    with ThreadPoolExecutor(streams, thread_name_prefix="embed-stream") as pool:
        pending = deque(pool.submit(embed, rows) for rows in islice(ranges, 2 * streams))
        try:
            while pending:
                batch = pending.popleft().result()
                rows = next(ranges, None)
                if rows is not None:
                    pending.append(pool.submit(embed, rows))
                yield batch
        finally:
            for future in pending:
                future.cancel()


def compute_embeddings(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                       num_workers: int = 0, progress: bool = False, desc: str = "embedding",
                       tta: str = "none", normalize: bool = True, pixels: PixelStats | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings (unless `normalize` is off), one row per dataset item, in dataset order."""
    chunks = []
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=None if progress else True, leave=False) as bar:
        for batch in iter_embeddings(model, dataset, batch_size, device, num_workers, tta, normalize, pixels):
            chunks.append(batch)
            bar.update(len(batch))
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()
