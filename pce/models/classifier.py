"""Image classifier: PCE (or dense) backbone -> SPP on the last map -> fully connected head (seeds 000/001)."""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import nn

from pce.layers.spp import SpatialPyramidPooling
from pce.models.backbone import PCEBackbone
from pce.models.presets import build_backbone


class PCEClassifier(nn.Module):
    """``[B, C, H, W] -> logits [B, num_classes]``.

    Args:
        backbone: a :class:`~pce.models.backbone.PCEBackbone` or a preset name (``overrides`` then go to the preset).
        num_classes: number of classes.
        spp_levels: pyramid levels of the head's SPP (the seeds use 1, 2, 4).
        dropout: dropout before the FC layer.

    Routing: ``with pce.record_routing(model) as rec`` around the forward (the task adds the router loss).
    """

    def __init__(self, backbone: Union[PCEBackbone, str], num_classes: int, spp_levels: Sequence[int] = (1, 2, 4),
                 spp_mode: str = "avg", dropout: float = 0.0, **overrides: Any) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, **overrides)
        elif overrides:
            raise TypeError(f"backbone overrides {sorted(overrides)} need a preset name, not a built backbone")
        self.backbone = backbone
        if backbone.out_indices[-1] != len(backbone.stages) - 1:
            raise ValueError("the classifier head reads the deepest stage: include it in out_indices")
        self.spp = SpatialPyramidPooling(spp_levels, spp_mode)
        self.num_features = self.spp.output_dim(backbone.feature_info[-1]["channels"])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> the deepest map ``[B, C_last, H / s, W / s]``."""
        return self.backbone.forward_intermediates(x, indices=[len(self.backbone.stages) - 1],
                                                   intermediates_only=True)[-1]

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """The deepest map -> logits ``[B, num_classes]`` (SPP, dropout, FC)."""
        return self.fc(self.drop(self.spp(feat)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # timm-style accessors
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> PCEClassifier:
    """``build_classifier("pce_fmnist", 10, router="gate")``: a backbone preset with an SPP + FC head.
    Head options (``spp_levels``, ``spp_mode``, ``dropout``) are taken from ``kwargs``; the rest are backbone
    overrides."""
    head_keys = {"spp_levels", "spp_mode", "dropout"}
    head = {k: kwargs.pop(k) for k in list(kwargs) if k in head_keys}
    return PCEClassifier(name, num_classes, **head, **kwargs)
