"""`build_model(cfg)`: a timm backbone, GeM pooling and an embedding neck, from a config.

Hub weights load as timm would load them; with `model.weights` the same architecture loads a
local file instead, which is how everything runs offline.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
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


class ReIDModel(nn.Module):
    """images -> L2-normalised embeddings (B, embedding_dim)."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, gem_p: float = 3.0, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(gem_p)
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, embedding_dim, bias=False),
                                  nn.BatchNorm1d(embedding_dim))

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


def _create_backbone(model_cfg: dict) -> nn.Module:
    name, weights = model_cfg["backbone"], model_cfg["weights"]
    kwargs = dict(num_classes=0, global_pool="", **(model_cfg["backbone_kwargs"] or {}))
    if weights:
        if not Path(weights).is_file():
            raise ConfigError(f"model.weights file '{weights}' not found; give the path of a local weights "
                              "file, or set model.weights to null to use the hub")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    else:
        kwargs.update(pretrained=bool(model_cfg["pretrained"]))
    if name.startswith("hf-hub:") and (weights or not model_cfg["pretrained"]):
        if name not in HUB_ARCHITECTURES:
            raise ConfigError(f"model.backbone '{name}': its architecture is only known from the hub; "
                              "offline, set model.backbone to the timm architecture name and model.weights to the file")
        name = HUB_ARCHITECTURES[name]
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"model.backbone '{name}' is not a timm model; see timm.list_models()") from None
        raise
    except TypeError as exc:
        raise ConfigError(f"model.backbone_kwargs do not fit '{name}': {exc}") from None


def build_model(cfg: dict) -> ReIDModel:
    mcfg = cfg["model"]
    return ReIDModel(_create_backbone(mcfg), mcfg["embedding_dim"], mcfg["gem_p"], mcfg["dropout"])


def preprocessing(model: ReIDModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) normalisation the backbone was trained with."""
    data_cfg = resolve_data_config({}, model=model.backbone)
    return tuple(data_cfg["mean"]), tuple(data_cfg["std"])
