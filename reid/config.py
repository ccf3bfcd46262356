"""Run configuration: YAML files layered over defaults, with dotted command-line overrides.

A config is a plain nested dict. Every key a recipe may set exists in DEFAULTS, so a typo in a
YAML file or a ``--set`` override is an error instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from reid.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "data": {
        "image_size": 224,        # square side fed to the model
        "hflip": "auto",          # auto: off when a viewpoint column tells flanks apart
        "cache_images": False,    # keep decoded, resized images in RAM (small datasets)
        "num_workers": 2,
        "augment_p": 1.0,         # share of training images augmented at all (the rest only letterboxed)
        "crop_scale": 1.0,        # < 1: random resized crops keeping at least this share of the area
        "grayscale_p": 0.0,       # probability of a grayscale training image
        "erasing_p": 0.3,         # probability of erasing one or two random patches
        "rotate_deg": 10.0,       # random rotation within +- this angle
        "scale_min": 0.85,        # random zoom range
        "scale_max": 1.1,
        "context_swap_p": 0.0,    # share of training images given another photo's surroundings (reid/data/mixing.py)
        "context_swap_keep": 0.34,  # half-width of the centred ellipse they keep, as a share of the image
        "jitter": 0.25,           # brightness/contrast jitter (saturation and hue scale with it)
    },
    "model": {
        "backbone": "hf-hub:BVRA/MegaDescriptor-L-384",
        "pretrained": True,
        "weights": None,          # local weights file: used instead of any hub download
        "backbone_kwargs": {},    # passed to timm.create_model (img_size, drop_path_rate, ...)
        "embedding_dim": 512,
        "gem_p": 3.0,
        "dropout": 0.0,
    },
    "loss": {
        "arcface_weight": 1.0,
        "triplet_weight": 1.0,
        "arcface_margin_deg": 28.6,  # pytorch-metric-learning's unit: degrees (0.5 rad)
        "arcface_scale": 64.0,
        "subcenters": 1,             # >1: sub-center ArcFace
        "triplet_margin": 0.3,
        "classes": "auto",           # identity | identity_viewpoint; auto: one class per flank when flanks are named
    },
    "sampler": {
        "p": 16,                  # identities per batch
        "k": 4,                   # images per identity
        "batches_per_epoch": None,  # default: images // (p * k), at least min_batches_per_epoch
        "min_batches_per_epoch": 0,  # floor on an epoch's optimiser steps, for small tables
    },
    "train": {
        "epochs": 30,
        "lr": 1.0e-4,
        "head_lr_mult": 10.0,
        "layer_decay": 0.8,
        "weight_decay": 0.05,
        "warmup_epochs": 1,
        "grad_accum": 1,
        "amp": True,              # used on GPU only
        "patience": 5,            # epochs without improvement before stopping; 0: never stop early
        "monitor": "mAP",         # validation metric early stopping and best.pt follow
        "min_delta": 0.0,
        "checkpoint_every": 0,    # optimiser steps between mid-epoch checkpoints; 0: epoch end only
        "init_from": None,        # checkpoint whose backbone and neck start the run
        "freeze_bn": False,       # keep the backbone's BatchNorm statistics as pretrained
        "frozen_layers": 0,       # lowest backbone layer groups (stages/blocks) kept frozen ...
        "frozen_epochs": 0,       # ... for this many first epochs (0 with frozen_layers > 0: the whole run)
        "ema_decay": 0.0,         # > 0: validate and keep an exponential moving average of the weights
        "whitening": False,       # fit the neck as learned whitening of the training images (reid/model/whitening.py)
        "whitening_shrink": 1.0,  # its regularisation: multiple of the mean within-individual variance
    },
    "cv": {
        "folds": 5,
        "split": "disjoint",      # closed | disjoint
        "workers": 1,             # folds trained at once, each in its own process (CPU threads shared out)
    },
    "eval": {
        "batch_size": 64,
        "train_probe_images": 256,  # training images scored each epoch next to held-out (0: off)
    },
    "index": {
        "kind": "auto",             # auto: exact flat up to ann_threshold vectors, else ivfpq
        "ann_threshold": 200_000,   # flat search of 200k x 512 takes ~100 ms a query on 2 cores
        "hnsw_ef_search": 128,
        "ivf_nprobe": 32,
    },
}


def _lookup_error(path: str, options: list[str]) -> ConfigError:
    section, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, options, n=1)
    prefix = f"{section}." if section else ""
    hint = (f"; did you mean '{prefix}{close[0]}'?" if close
            else f"; known keys here: {', '.join(prefix + o for o in sorted(options))}")
    return ConfigError(f"unknown config key '{path}'{hint}")


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise _lookup_error(path, list(base))
        if isinstance(base[key], dict) and key != "backbone_kwargs":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give it a mapping, not {value!r}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = _coerce(path, base[key], value)
    return base


def _coerce(path: str, default: Any, value: Any) -> Any:
    """Give a number key a number: YAML 1.1 reads '1e-3' as a string, and a typo should not pass."""
    if isinstance(default, bool) or not isinstance(default, (int, float)) or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value) if isinstance(default, float) else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{path}' needs a number, got {value!r}") from None
    return int(number) if isinstance(default, int) and number.is_integer() else number


def resolve_config_path(name: str | Path) -> Path:
    """A path to a YAML file, or the name of a file in the project's configs/ folder."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name}' not found; give a YAML path or one of: {known}")


def nested(dotted: str, value: Any) -> dict:
    """'train.epochs', 3 -> {'train': {'epochs': 3}}."""
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def with_values(cfg: dict, values: dict[str, Any]) -> dict:
    """A copy of `cfg` with each dotted key set to its value, checked as overrides are."""
    out = copy.deepcopy(cfg)
    for dotted, value in values.items():
        _merge(out, nested(dotted, value))
    return out


def parse_override(text: str) -> dict:
    """'train.epochs=3' -> {'train': {'epochs': 3}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return nested(key, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults, then the YAML file, then each override in order."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        file = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        try:
            _merge(cfg, loaded)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
    for text in overrides:
        _merge(cfg, parse_override(text))
    return cfg


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
