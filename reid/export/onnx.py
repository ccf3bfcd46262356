"""`reid export --format onnx`: a checkpoint's model as an ONNX graph that ONNX Runtime serves.

The graph is the model exactly as `Embedder` runs it per view, behind the normalisation of its
pixels (uint8 RGB batch in, L2-normalised embeddings out, any batch size): ONNX Runtime normalises
on its own threads, and another tool needs no mean and std to feed it. The metadata is the
checkpoint's record (reid/export/onnx_format.py). The export is written only once ONNX Runtime's
vectors of random batches match PyTorch's to `PARITY_MIN_COSINE`, at batch sizes other than the
one traced, since a trace silently freezes any shape-dependent Python code.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from reid.checkpoint import inference_model, load_inference
from reid.embedding.compute import PixelStats, normalize_pixels
from reid.errors import ReidError
from reid.export.onnx_format import INPUT_NAME, OUTPUT_NAME, PARITY_MIN_COSINE, onnx_metadata

# opset 17 runs on every ONNX Runtime since 1.14 and has every operator timm's CNNs and ViTs use
DEFAULT_OPSET = 17
TRACE_BATCH, CHECK_BATCHES = 2, (1, 3)


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    fingerprint: str         # the Embedder fingerprint of the model (the checkpoint's, at its own TTA)
    parity_min_cosine: float  # ONNX Runtime against PyTorch on the check batches
    embedding_dim: int
    image_size: int


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, seed: int = 0) -> OnnxExport:
    """Write the ONNX export of `checkpoint` (a best.pt) to `out`, atomically, once it is checked."""
    import onnx

    from reid.embedding.embedder import Embedder, weights_fingerprint
    from reid.embedding.onnx_runtime import onnx_session
    from reid.io import atomic_path

    state = load_inference(checkpoint)
    model = inference_model(state)
    pre = state["preprocessing"]
    size = int(pre["image_size"])
    generator = torch.Generator().manual_seed(seed)

    def batch(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)

    pixels = (pre["mean"], pre["std"])
    graph = onnx.load_from_string(_trace(PixelInput(model, pixels).eval(), batch(TRACE_BATCH), opset, checkpoint))
    session = onnx_session(graph.SerializeToString())
    parity = min(_min_cosine(model, pixels, session, batch(n)) for n in CHECK_BATCHES)
    if parity < PARITY_MIN_COSINE:
        raise ReidError(f"the ONNX export of '{checkpoint}' embeds differently from PyTorch (cosine {parity:.6f} < "
                        f"{PARITY_MIN_COSINE}); nothing was written: serve the checkpoint itself")
    # the fingerprint `Embedder.from_checkpoint` gives the checkpoint, which the export keeps (onnx_format.py)
    weights_sha256 = weights_fingerprint(state["model"])
    fingerprint = Embedder.from_record(model, state, weights_sha256, device=torch.device("cpu")).fingerprint
    metadata = onnx_metadata(state, weights_sha256, source_checkpoint=str(checkpoint), fingerprint=fingerprint,
                             parity_min_cosine=parity, opset=opset)
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph)
    with atomic_path(out) as tmp:
        onnx.save(graph, tmp)
    return OnnxExport(Path(out), fingerprint, parity, model.embedding_dim, size)


class PixelInput(torch.nn.Module):
    """`model` taking the uint8 RGB batch the embedder's transform makes, normalised with `pixels`
    by the embedder's own function: what the export traces."""

    def __init__(self, model: torch.nn.Module, pixels: PixelStats):
        super().__init__()
        self.model, self.pixels = model, pixels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize_pixels(images, self.pixels))


def _trace(model: torch.nn.Module, example: torch.Tensor, opset: int, checkpoint) -> bytes:
    """The ONNX bytes of `model`, by the TorchScript-based exporter (the dynamo one needs onnxscript),
    with a dynamic batch axis."""
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # deprecation notices of that exporter, and the tracer's notes about shape-dependent code,
            # which the parity check at other batch sizes settles
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter fails with many types on an unsupported model
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReidError(f"the model of '{checkpoint}' cannot be exported to ONNX (opset {opset}): {message}; "
                        "try another --opset, or serve the checkpoint itself") from None
    return buffer.getvalue()


@torch.no_grad()
def _min_cosine(model: torch.nn.Module, pixels: PixelStats, session, images: torch.Tensor) -> float:
    """The lowest cosine between ONNX Runtime's and PyTorch's embedding of the same uint8 image."""
    reference = model(normalize_pixels(images, pixels))
    exported = torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])
    return float((reference * exported).sum(dim=1).min())
