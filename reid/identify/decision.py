"""The identify decision, and the thresholds it uses: their defaults and where each comes from.

A species' thresholds are its route's own values (routes file), else its checkpoint's calibration
(`reid calibrate`), else the defaults (the service's settings, which start from DEFAULT_THRESHOLDS).
The best candidate's cosine similarity is then `match` at or above the match threshold, `new`
below the new threshold, and `uncertain` in between. Thresholds are calibrated on cosine scores,
so re-ranking chooses *which* individual is first while the cosine of that individual says how
sure the answer is.
"""
from __future__ import annotations

import math

from reid.errors import ConfigError

DEFAULT_THRESHOLDS = {"match_threshold": 0.7, "new_threshold": 0.5}
KEYS = ("match_threshold", "new_threshold")


def check_threshold(value, where: str) -> float | None:
    """A threshold as configured: None (not set) or a cosine similarity in [-1, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -1.0 <= value <= 1.0:
        raise ConfigError(f"{where}: must be a cosine similarity between -1 and 1, got {value!r}")
    return float(value)


def resolve_thresholds(own: dict, calibrated: dict | None, defaults: dict | None = None,
                       defaults_source: str = "default", where: str = "thresholds") -> tuple[dict, str]:
    """(thresholds, source). `own` values (None: unset) win; the rest come from `calibrated` (the
    checkpoint's), else `defaults`. The source says which: `route`, `checkpoint`, `defaults_source`,
    or `route+checkpoint` / `route+<defaults_source>` when the route sets only one."""
    base, source = ((dict(calibrated), "checkpoint") if calibrated
                    else (dict(defaults or DEFAULT_THRESHOLDS), defaults_source))
    set_here = {key: own[key] for key in KEYS if own.get(key) is not None}
    thresholds = {**base, **set_here}
    if set_here:
        source = "route" if len(set_here) == len(KEYS) else f"route+{source}"
    if thresholds["new_threshold"] > thresholds["match_threshold"]:
        raise ConfigError(f"{where}: new_threshold {thresholds['new_threshold']} is above match_threshold "
                          f"{thresholds['match_threshold']} ({source})")
    return {key: float(thresholds[key]) for key in KEYS}, source


def stored_thresholds(calibration) -> dict | None:
    """The match / new thresholds of a checkpoint's `calibration` entry, or None when it has none."""
    if isinstance(calibration, dict) and set(KEYS) <= calibration.keys():
        return {key: float(calibration[key]) for key in KEYS}
    return None


def decide(score: float | None, thresholds: dict) -> str:
    """`match`, `new` or `uncertain` for the best candidate's score (`new` when there is none)."""
    if score is None or score < thresholds["new_threshold"]:
        return "new"
    if score >= thresholds["match_threshold"]:
        return "match"
    return "uncertain"
