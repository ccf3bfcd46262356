"""Reading the JSON files of other tools (MegaDetector, SpeciesNet) with messages a user can act on.

Every problem is reported as `file: position: what is wrong`, the position written as a path into
the document (`images[3].detections[1].bbox`), so that the user can find the entry in an editor
or with jq.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from reid.errors import DataError

BOX_SLACK = 1e-3  # tools round coordinates to 4 digits, so x + width may pass 1 by that much


def load_json(path: str | Path, what: str) -> Any:
    """The parsed document; `what` names the expected content for the messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file '{path}' not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; expected {what} JSON") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"expected {what} JSON") from None


class Position:
    """Where a value sits in a JSON file, for error messages."""

    def __init__(self, file: str | Path, path: str = ""):
        self.file, self.path = str(file), path

    def __truediv__(self, key: str | int) -> Position:
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if self.path else key)
        return Position(self.file, self.path + step)

    def error(self, problem: str) -> DataError:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return DataError(f"{where}: {problem}")


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
               float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def field(obj: dict, key: str, kind: type | tuple[type, ...], at: Position, required: bool = True) -> Any:
    """obj[key], checked to be of `kind`; None when absent and not `required`."""
    if key not in obj:
        if required:
            raise at.error(f"missing key '{key}'")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        expected = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in _types(kind)))
        raise (at / key).error(f"must be {expected}, not {_kind(value)} ({json.dumps(value)[:60]})")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def entries(items: list, at: Position, what: str) -> list[dict]:
    """`items`, checked to be all objects."""
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise (at / index).error(f"must be an object ({what}), not {_kind(item)}")
    return items


def unit_number(obj: dict, key: str, at: Position) -> float:
    """A required number in [0, 1] (confidences, scores)."""
    return unit_value(field(obj, key, (int, float), at), at / key)


def unit_value(value: Any, at: Position) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise at.error(f"must be a number between 0 and 1, not {_kind(value)}")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise at.error(f"must be between 0 and 1, got {value}")
    return float(value)


def bbox(obj: dict, at: Position) -> tuple[float, float, float, float]:
    """obj['bbox']: normalised [x_min, y_min, width, height] inside the image."""
    box = field(obj, "bbox", list, at)
    at = at / "bbox"
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise at.error(f"must be 4 numbers [x_min, y_min, width, height], got {json.dumps(box)[:80]}")
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x, y, w, h)):
        raise at.error(f"{[x, y, w, h]} has values outside [0, 1]; boxes are normalised by the image size")
    if x + w > 1 + BOX_SLACK or y + h > 1 + BOX_SLACK:
        raise at.error(f"{[x, y, w, h]} reaches past the image (x_min + width or y_min + height above 1)")
    return x, y, w, h
