"""Optimiser set-up: layer-wise learning-rate decay (LLRD), AdamW, warmup then cosine.

The top backbone layer learns at the base LR, each layer below at `layer_decay` times the one
above, and the new head (pooling, neck, ArcFace centres) at `head_lr_mult` times the base LR:
pretrained low-level features move least, the randomly initialised head most.
"""
from __future__ import annotations

import math

import torch
from timm.models import group_parameters
from torch import nn


def _is_transformer(backbone: nn.Module) -> bool:
    return hasattr(backbone, "num_prefix_tokens") or getattr(backbone, "output_fmt", "NCHW") == "NHWC"


def backbone_layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Parameter name -> depth index (0 = stem). Blocks for transformers, stages for CNNs."""
    names = [name for name, _ in backbone.named_parameters()]
    if not hasattr(backbone, "group_matcher"):
        return {name: 0 for name in names}
    matcher = backbone.group_matcher(coarse=not _is_transformer(backbone))
    layer_of = group_parameters(backbone, matcher, reverse=True)
    # timm puts the final norm/head in a far-away group id; renumber densely so it sits just above the last block
    dense = {old: new for new, old in enumerate(sorted(set(layer_of.values())))}
    return {name: dense[layer_of[name]] for name in names}


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))


def param_groups(backbone: nn.Module, head: list[nn.Module], train_cfg: dict) -> list[dict]:
    """AdamW parameter groups with their own `lr` and `weight_decay`, named for logs and tests."""
    base_lr, decay, wd = train_cfg["lr"], train_cfg["layer_decay"], train_cfg["weight_decay"]
    layer_ids = backbone_layer_ids(backbone)
    top = max(layer_ids.values(), default=0)
    groups: dict[str, dict] = {}

    def add(group_name: str, lr: float, weight_decay: float, param: nn.Parameter) -> None:
        group = groups.setdefault(group_name, {"name": group_name, "lr": lr, "weight_decay": weight_decay, "params": []})
        group["params"].append(param)

    for name, param in backbone.named_parameters():
        if param.requires_grad:
            layer = layer_ids[name]
            kind = "no_decay" if _no_decay(name, param) else "decay"
            add(f"backbone_layer{layer:02d}_{kind}", base_lr * decay ** (top - layer), 0.0 if kind == "no_decay" else wd, param)
    head_lr = base_lr * train_cfg["head_lr_mult"]
    for module in head:
        for name, param in module.named_parameters():
            if param.requires_grad:
                kind = "no_decay" if param.ndim <= 1 else "decay"
                add(f"head_{kind}", head_lr, 0.0 if kind == "no_decay" else wd, param)
    return list(groups.values())


def build_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's LR, then cosine decay to zero, stepped once per optimiser step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
