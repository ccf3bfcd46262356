"""What a wildreid ONNX model records besides its graph, in one place: `reid export` writes it, the
ONNX Runtime backend (reid/embedding/onnx_runtime.py) reads it.

The graph maps the uint8 RGB image batch (N, 3, S, S), letterboxed as `Embedder`'s transform makes
it, to the L2-normalised embeddings (N, D) of one view; it normalises the pixels itself (format 2;
format 1 took the normalised float32 batch, and is still read). Everything else a checkpoint
says about its vectors is in the model's `metadata_props`, one JSON value per key: the config, the
preprocessing, the calibration and post-processing of `reid calibrate` (flip TTA among them: the
runtime embeds the flipped views itself, with the code that serves checkpoints), the whitening
record, the class identities when they are few, and `weights_sha256`, the hash of the source
checkpoint's tensors.

That hash is the one `Embedder` puts in its fingerprint, so an ONNX model has the fingerprint of
the checkpoint it came from, on purpose: its vectors agree with PyTorch's to float rounding (the
export refuses to write a model whose vectors do not, see `PARITY_MIN_COSINE`), like the vectors of
one checkpoint on CPU and on a GPU, which share a fingerprint too. A store, an embedding cache or an
identify-batch run made with the checkpoint therefore goes on with its ONNX export without embedding
anything again, and vectors of different weights still never meet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from reid.errors import ReidError
from reid.io import to_json

ONNX_KIND = "wildreid-reid-onnx"
ONNX_FORMAT = 2  # raised when a reader of an older wildreid could misread the model (2: uint8 input)
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# cosine between ONNX Runtime's and PyTorch's embedding of the same image, at the least
PARITY_MIN_COSINE = 0.9999
# class identities are recorded only up to this many JSON bytes: a model is not a label database
IDENTITIES_MAX_BYTES = 1 << 20

# entries of the checkpoint's inference record (reid/checkpoint.py) recorded as they are
RECORD_KEYS = ("config", "preprocessing", "class_mode", "calibration", "postprocessing", "whitening")
REQUIRED_KEYS = ("config", "preprocessing", "weights_sha256")
# every key `onnx_metadata` writes (each a JSON value); `facts` are what the export measured, for people
FACT_KEYS = ("source_checkpoint", "fingerprint", "parity_min_cosine", "opset")
JSON_KEYS = ("kind", "format", "wildreid_version", "weights_sha256", "identity_count", "identities", *RECORD_KEYS,
             *FACT_KEYS)


def onnx_metadata(state: dict, weights_sha256: str, **facts) -> dict[str, str]:
    """The metadata_props of the ONNX export of inference record `state`; `facts` (FACT_KEYS) adds what
    the export measured: the source file, the fingerprint, the parity with PyTorch."""
    from reid import __version__

    unknown = set(facts) - set(FACT_KEYS)
    if unknown:
        raise ValueError(f"not metadata of a wildreid ONNX model: {', '.join(sorted(unknown))}")

    identities = list(state.get("identities") or [])
    listed = to_json(identities)
    values = {"kind": ONNX_KIND, "format": ONNX_FORMAT, "wildreid_version": __version__,
              "weights_sha256": weights_sha256, "identity_count": len(identities),
              **{key: state.get(key) for key in RECORD_KEYS}, **facts}
    metadata = {key: to_json(value) for key, value in values.items()}
    if len(listed.encode()) <= IDENTITIES_MAX_BYTES:
        metadata["identities"] = listed
    return metadata


def read_onnx_metadata(props: Mapping[str, str], path: str | Path) -> dict:
    """The record of an ONNX model's metadata_props: what `load_inference` gives for a checkpoint, but with
    `weights_sha256` in place of the weights. ReidError when the model is not a wildreid export."""
    export_hint = f"export the run's best.pt with `reid export --checkpoint best.pt --format onnx --out {path}`"
    if "kind" not in props:
        raise ReidError(f"'{path}' is an ONNX model but not one of wildreid (its metadata names no wildreid kind); "
                        f"{export_hint}")
    record = dict(props)  # keys other tools added stay the strings they are
    for key in set(props) & set(JSON_KEYS):
        try:
            record[key] = json.loads(props[key])
        except json.JSONDecodeError as exc:
            raise ReidError(f"'{path}': its wildreid metadata '{key}' is damaged ({exc}); {export_hint}") from None
    if record["kind"] != ONNX_KIND:
        raise ReidError(f"'{path}' is an ONNX model of kind '{record['kind']}', not a wildreid re-ID model "
                        f"({ONNX_KIND}); {export_hint}")
    if not isinstance(record.get("format"), int) or record["format"] > ONNX_FORMAT:
        raise ReidError(f"'{path}' was exported by a newer wildreid (format {record.get('format')}, this one reads "
                        f"{ONNX_FORMAT} and older); upgrade wildreid, or {export_hint}")
    missing = [key for key in REQUIRED_KEYS if not record.get(key)]
    if missing:
        raise ReidError(f"'{path}': its wildreid metadata lacks {', '.join(missing)}; {export_hint}")
    return record
