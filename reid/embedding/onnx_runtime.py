"""ONNX Runtime in the place of the PyTorch model: an `Embedder` over an exported model (`reid export`).

`OnnxModel` is a module like `ReIDModel` (image batch in, L2-normalised embeddings out), so the
ONNX path runs the very code of the PyTorch one around it: the same transform, the same DataLoader,
the same flip views averaged by `embed_batch`. Only the forward pass differs, and where the pixels
are normalised: inside the graph of a format-2 export, which takes the uint8 batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from reid.errors import ReidError
from reid.export.onnx_format import INPUT_NAME, read_onnx_metadata

ONNX_SUFFIX = ".onnx"


def is_onnx(path: str | Path) -> bool:
    """Whether a model path names an ONNX export rather than a training checkpoint."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


class OnnxModel(nn.Module):
    """An ONNX Runtime session that embeds torch batches; always on the CPU.

    ONNX Runtime releases the GIL for the whole run, which the service's model thread needs (the
    reason it traces PyTorch models on CPU): `releases_gil` tells it no trace is wanted.
    """
    releases_gil = True
    input_memory_format = torch.contiguous_format  # NCHW, as ONNX Runtime takes it: no copy per view

    def __init__(self, session, path: str | Path, streams: int = 1):
        super().__init__()
        self.session, self.path = session, Path(path)
        # batches a caller may run side by side, each on its share of the session's threads
        # (reid.embedding.compute.iter_embeddings does; `load_onnx`'s `streams`)
        self.streams = int(streams)
        self.embedding_dim = int(session.get_outputs()[0].shape[1])
        # a format-2 export normalises its uint8 input in the graph; format 1 takes normalised floats
        self.normalizes_input = session.get_inputs()[0].type == "tensor(uint8)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalizes_input and images.dtype != torch.uint8:
            raise ValueError(f"'{self.path}' takes uint8 pixels, not a {images.dtype} batch")
        # a no-op for `embed_batch`'s NCHW views; other callers may hand channels-last batches
        array = np.ascontiguousarray(images.detach().cpu().numpy(),
                                     dtype=np.uint8 if self.normalizes_input else np.float32)
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: array})[0])


def onnx_session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of a model file (or its bytes), with `threads` intra-op threads
    (default: torch's setting, which `--torch-threads` and OMP_NUM_THREADS set for the service)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ReidError("ONNX models run on ONNX Runtime, which is not installed: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # one graph node at a time: the intra-op threads are all the cores we take
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle threads sleep instead of spinning: spinning gains nothing measurable here and takes the
    # cores from the loader's decoding workers and the service's request threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its optimiser's notes would reach every command's stderr
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path, threads: int | None = None, streams: int = 1) -> tuple[OnnxModel, dict]:
    """The model of a wildreid ONNX file and its record (reid/export/onnx_format.py): what
    `load_inference` gives for a checkpoint, with `weights_sha256` in place of the weights.

    `streams` > 1 splits the `threads` between that many batches run side by side (batch jobs):
    one batch's layers then never wait at a barrier for a core that another thread holds while it
    decodes photos (scripts/bench_embed.py). One stream gives a lone photo every core (a service)."""
    path = Path(path)
    threads = threads or torch.get_num_threads()
    streams = max(1, min(int(streams), threads))
    export_hint = f"export the run's best.pt again with `reid export --checkpoint best.pt --format onnx --out {path}`"
    if path.is_dir():
        raise ReidError(f"'{path}' is a folder, not an ONNX model file; give the .onnx file `reid export` wrote")
    if not path.is_file():
        raise ReidError(f"ONNX model '{path}' not found")
    try:
        session = onnx_session(path, threads // streams)
    except ReidError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a damaged file
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidError(f"ONNX model '{path}' is unreadable ({message}); {export_hint}") from None
    record = read_onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or len(outputs) != 1 or len(outputs[0].shape) != 2 \
            or not isinstance(outputs[0].shape[1], int):
        raise ReidError(f"'{path}' does not map one '{INPUT_NAME}' batch to embeddings, as a wildreid export "
                        f"does; {export_hint}")
    return OnnxModel(session, path, streams), record
