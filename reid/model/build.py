"""`build_model(cfg)`: a timm backbone, GeM pooling and an embedding neck, from a config.

Hub weights load as timm would load them; with `model.weights` the same architecture loads a
local file instead, which is how everything runs offline.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from reid.errors import ConfigError
from reid.model.layers import GeM

# timm reads an hf-hub model's architecture from the hub's config.json; offline, we know these.
HUB_ARCHITECTURES = {
    "hf-hub:BVRA/MegaDescriptor-T-224": "swin_tiny_patch4_window7_224",
    "hf-hub:BVRA/MegaDescriptor-S-224": "swin_small_patch4_window7_224",
    "hf-hub:BVRA/MegaDescriptor-B-224": "swin_base_patch4_window7_224",
    "hf-hub:BVRA/MegaDescriptor-L-224": "swin_large_patch4_window7_224",
    "hf-hub:BVRA/MegaDescriptor-L-384": "swin_large_patch4_window12_384",
}

# build_model decides these itself: features without timm's head, weights from model.pretrained / model.weights
_RESERVED_KWARGS = ("pretrained", "pretrained_cfg_overlay", "num_classes", "global_pool")


class ReIDModel(nn.Module):
    """images -> L2-normalised embeddings (B, embedding_dim).

    `backbone`, `pool` and `neck` are the attributes the trainer groups parameters by.
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, gem_p: float = 3.0, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(gem_p)
        # Dropout(0.0) is a no-op, and keeping it leaves the state-dict keys the same for any dropout
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, embedding_dim, bias=False),
                                  nn.BatchNorm1d(embedding_dim))

    @property
    def embedding_dim(self) -> int:
        return int(self.neck[1].out_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, num_features), whatever layout the backbone emits."""
        x = self.backbone.forward_features(images)
        if x.ndim == 3:  # ViT tokens: pool the patches, not the class/register tokens
            return self.pool(x[:, getattr(self.backbone, "num_prefix_tokens", 0):], dims=(1,))
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # Swin
            return self.pool(x, dims=(1, 2))
        return self.pool(x, dims=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.features(images)).float(), dim=1)


def _architecture(model_cfg: dict) -> str:
    """The timm name to build: the backbone name, or a known hub name's architecture when no hub
    download is wanted (timm would download config.json just to learn the architecture)."""
    name = model_cfg["backbone"]
    downloads = model_cfg["pretrained"] and not model_cfg["weights"]
    if not name.startswith("hf-hub:") or downloads:
        return name
    if name not in HUB_ARCHITECTURES:
        raise ConfigError(f"model.backbone '{name}': its architecture is only known from the hub; offline, set "
                          "model.backbone to the timm architecture name and model.weights to the weights file")
    return HUB_ARCHITECTURES[name]


def _check_timm_name(arch: str) -> None:
    """A registered timm model, and a pretrained tag (name.tag) it has; hub names are checked by the hub."""
    if arch.startswith("hf-hub:"):
        return
    if not timm.is_model(arch):
        raise ConfigError(f"model.backbone '{arch}' is not a timm model; see timm.list_models()")
    try:
        timm.models.get_pretrained_cfg(arch)
    except RuntimeError as exc:  # an unknown tag
        raise ConfigError(f"model.backbone '{arch}': {exc}") from None


def _weights_overlay(arch: str, weights: str) -> dict:
    """The pretrained-config overlay that makes timm load the local file `weights`.

    timm drops the classifier of a file when the model has none (num_classes=0 here) and then loads
    non-strictly, so a file whose keys do not fit (a wrapped checkpoint, another model) would leave
    the backbone randomly initialised, with only a log line. A file without the architecture's
    classifier is therefore declared headless, which keeps timm's load strict; a file that has it
    already uses timm's key names.
    """
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"model.weights file '{weights}' not found; give the path of a local weights file, "
                          "or set model.weights to null")
    try:
        keys = set(timm.models.load_state_dict(str(path)))
    except Exception as exc:  # safetensors and torch.load fail with many unrelated types on a bad file
        raise ConfigError(f"model.weights file '{weights}' could not be read as a state dict: {exc}") from None
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    classifier = (pretrained_cfg.classifier if pretrained_cfg else None) or ()
    names = (classifier,) if isinstance(classifier, str) else classifier
    overlay = {"file": str(path)}
    if not any(f"{name}.weight" in keys for name in names):
        overlay["num_classes"] = 0
    return overlay


def _backbone_kwargs(model_cfg: dict, arch: str) -> dict:
    extra = dict(model_cfg["backbone_kwargs"] or {})
    reserved = sorted(set(extra) & set(_RESERVED_KWARGS))
    if reserved:
        raise ConfigError(f"model.backbone_kwargs may not set {', '.join(reserved)}: build_model sets them "
                          "(choose weights with model.pretrained and model.weights)")
    # features only: GeM and the neck replace timm's pooling and classifier
    kwargs = dict(num_classes=0, global_pool="", **extra)
    if model_cfg["weights"]:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=_weights_overlay(arch, model_cfg["weights"]))
    else:
        kwargs.update(pretrained=bool(model_cfg["pretrained"]))
    return kwargs


def _load_error_summary(exc: RuntimeError) -> str:
    """torch's strict-load error lists every missing and unexpected key; their first few show the mismatch."""
    lines = str(exc).splitlines()[:6]
    return "\n".join(textwrap.shorten(line, 240, placeholder=" ...") for line in lines)


def _create_backbone(model_cfg: dict) -> nn.Module:
    arch = _architecture(model_cfg)
    _check_timm_name(arch)
    kwargs = _backbone_kwargs(model_cfg, arch)
    weights = model_cfg["weights"]
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.backbone_kwargs do not fit '{arch}': {exc}") from None
    except RuntimeError as exc:
        if weights:
            raise ConfigError(f"model.weights file '{weights}' does not fit '{arch}' (it must hold that "
                              f"architecture's timm weights): {_load_error_summary(exc)}") from None
        raise
    except OSError as exc:  # huggingface_hub and urllib report an unreachable hub as OSError
        if weights:
            raise
        raise ConfigError(f"could not download the pretrained weights of '{arch}' ({exc}); offline, set "
                          "model.weights to a local weights file, or model.pretrained to false") from None


def build_model(cfg: dict) -> ReIDModel:
    """The model described by the config's `model` section."""
    mcfg = cfg["model"]
    return ReIDModel(_create_backbone(mcfg), mcfg["embedding_dim"], mcfg["gem_p"], mcfg["dropout"])


def preprocessing(model: ReIDModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) normalisation the backbone was trained with."""
    data_cfg = resolve_model_data_config(model.backbone)
    return tuple(data_cfg["mean"]), tuple(data_cfg["std"])
