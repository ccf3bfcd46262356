"""Model inference off the event loop, micro-batched across concurrent requests.

Requests preprocess their own images (decode, letterbox, normalise: in the threadpool, in
parallel) and put the tensors on a queue; one worker thread takes everything queued, up to
`max_batch` images, and runs them through the model in one forward pass. When a batch is not full
and other requests are still preparing images (`incoming`), the worker waits up to `window_s` for
them; a lone request is never delayed.

`ModelRunner` splits `Embedder.embed_images` in these two halves: `forward(preprocess(x))` is
exactly `embed_images(x)` (the same transform, `embed_batch` and TTA). On CPU it runs a TorchScript
trace of the model, which computes the same numbers without holding the GIL between layers (an ONNX
model runs as it is: ONNX Runtime releases the GIL itself).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from reid.embedding.compute import embed_batch
from reid.embedding.embedder import Embedder

log = logging.getLogger("wildreid.service")


def gil_free(model: torch.nn.Module, device: torch.device, image_size: int) -> torch.nn.Module:
    """On CPU, a TorchScript trace of `model` when it gives bit-identical embeddings, else `model`.

    The eager model takes the GIL back between layers; in the server the event loop and the decoding
    threads hold it often, so the model thread waited for it layer after layer and its other OpenMP
    thread idled: a forward pass took ~1.6x its time alone (resnet18, 2 cores, 32 clients). The
    trace runs the whole forward in C++ with the GIL released. It is checked at another batch size
    than the one traced, since a trace silently freezes any shape-dependent Python code.
    """
    if device.type != "cpu" or getattr(model, "releases_gil", False):  # ONNX Runtime runs without the GIL
        return model

    def batch(size: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(size, 3, image_size, image_size, generator=generator).contiguous(
            memory_format=torch.channels_last)

    check = batch(3, 1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # deprecated in favour of torch.compile / torch.export, whose CPU code still runs in Python;
            # the tracer's warnings about shape-dependent code are what the equality check below settles
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, batch(2, 0), check_trace=False)
            same = torch.equal(traced(check), model(check))
    except Exception as exc:  # noqa: BLE001 - some backbones cannot be traced: the eager model serves
        log.warning("serving the eager model: tracing it failed (%s)", exc)
        return model
    if not same:
        log.warning("serving the eager model: its trace computes different embeddings")
        return model
    return traced


class ModelRunner:
    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.dim = embedder.embedding_dim
        self.fingerprint = embedder.fingerprint
        self.image_size = embedder.image_size
        self.model = gil_free(embedder.model, embedder.device, embedder.image_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return self.embedder.transform(image=image)["image"]

    def forward(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        if not tensors:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack(list(tensors))
        return embed_batch(self.model, batch, self.embedder.device, self.embedder.tta,
                           pixels=self.embedder.pixels).numpy()


@dataclass
class _Job:
    items: list
    future: Future


_STOP = object()


class MicroBatcher:
    def __init__(self, forward: Callable[[list], np.ndarray], max_batch: int = 32, window_s: float = 0.002,
                 observe: Callable[[int, float], None] | None = None):
        self.forward, self.max_batch, self.window_s = forward, int(max_batch), float(window_s)
        self.observe = observe
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._incoming = 0
        self._incoming_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="wildreid-model", daemon=True)
        self.batches = 0
        self.images = 0

    def start(self) -> "MicroBatcher":
        self.thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join(timeout)

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request that will submit images soon (the worker may wait a little for it)."""
        with self._incoming_lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._incoming_lock:
                self._incoming -= 1

    def submit(self, items: list) -> Future:
        future: Future = Future()
        if not items:
            future.set_result(np.zeros((0, 0), dtype=np.float32))
            return future
        if not self.thread.is_alive():
            future.set_exception(RuntimeError("the model worker is not running"))
            return future
        self.queue.put(_Job(list(items), future))
        return future

    async def embed(self, items: list) -> np.ndarray:
        """Embeddings of preprocessed items, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(items))

    def embed_sync(self, items: list) -> np.ndarray:
        return self.submit(items).result()

    # ------------------------------------------------------------------ the worker thread
    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, count, stop = [first], len(first.items), False
        deadline = time.monotonic() + self.window_s
        while count < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._incoming == 0:
                    break
                try:
                    job = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                stop = True
                break
            jobs.append(job)
            count += len(job.items)
        return jobs, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is _STOP:
                break
            jobs, stop = self._gather(first)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            items = [item for job in live for item in job.items]
            if not items:
                continue
            started = time.perf_counter()
            try:
                chunks = [self.forward(items[i:i + self.max_batch]) for i in range(0, len(items), self.max_batch)]
                out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                log.exception("model forward failed")
                for job in live:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(items)
            if self.observe:
                self.observe(len(items), time.perf_counter() - started)
            offset = 0
            for job in live:
                job.future.set_result(out[offset:offset + len(job.items)])
                offset += len(job.items)
        # anything still queued gets an answer rather than hanging
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
