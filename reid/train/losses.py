"""The metric-learning objective: ArcFace (optionally sub-center) plus batch-hard triplet.

Both come from pytorch-metric-learning. ArcFace's class centres are parameters, so the loss is an
nn.Module trained (and checkpointed) with the model.
"""
from __future__ import annotations

import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from reid.errors import ConfigError


class ReIDLoss(nn.Module):
    def __init__(self, num_classes: int, embedding_dim: int, loss_cfg: dict):
        super().__init__()
        self.arcface_weight = float(loss_cfg["arcface_weight"])
        self.triplet_weight = float(loss_cfg["triplet_weight"])
        if self.arcface_weight <= 0 and self.triplet_weight <= 0:
            raise ConfigError("loss.arcface_weight and loss.triplet_weight are both 0: nothing to train")
        self.arcface = None
        if self.arcface_weight > 0:
            kwargs = dict(num_classes=num_classes, embedding_size=embedding_dim,
                          margin=loss_cfg["arcface_margin_deg"], scale=loss_cfg["arcface_scale"])
            subcenters = int(loss_cfg["subcenters"])
            self.arcface = (losses.SubCenterArcFaceLoss(sub_centers=subcenters, **kwargs) if subcenters > 1
                            else losses.ArcFaceLoss(**kwargs))
        self.triplet = losses.TripletMarginLoss(margin=loss_cfg["triplet_margin"])
        self.miner = miners.BatchHardMiner()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        embeddings = embeddings.float()  # margins and scale 64 overflow in half precision
        parts: dict[str, torch.Tensor] = {}
        if self.arcface is not None:
            parts["arcface"] = self.arcface(embeddings, labels)
        if self.triplet_weight > 0:
            parts["triplet"] = self.triplet(embeddings, labels, self.miner(embeddings, labels))
        total = sum(getattr(self, f"{name}_weight") * value for name, value in parts.items())
        return total, {name: value.item() for name, value in parts.items()}


class TrainStep(nn.Module):
    """Model and loss in one module, so DistributedDataParallel syncs the ArcFace centres too."""

    def __init__(self, model: nn.Module, loss: ReIDLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return self.loss(self.model(images), labels)
