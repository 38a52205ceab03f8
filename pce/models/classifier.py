"""Image classifier: PCE (or dense) backbone -> SPP on the last map -> fully connected head (seeds 000/001)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from pce.models.backbone import PCEBackbone, build_backbone
from pce.moe.losses import RouterLossWeights, router_loss
from pce.layers.spp import SpatialPyramidPooling


class PCEClassifier(nn.Module):
    """``[B, C, H, W] -> logits [B, num_classes]``.

    Args:
        backbone: a :class:`~pce.models.backbone.PCEBackbone` or a preset name (``overrides`` then go to the preset).
        num_classes: number of classes.
        spp_levels: pyramid levels of the head's SPP (the seeds use 1, 2, 4).
        dropout: dropout before the FC layer.
        router_loss_weights: weights of the router regularisers added by :meth:`losses`.
    """

    def __init__(self, backbone: Union[PCEBackbone, str], num_classes: int, spp_levels: Sequence[int] = (1, 2, 4),
                 spp_mode: str = "avg", dropout: float = 0.0,
                 router_loss_weights: Optional[Union[RouterLossWeights, Mapping[str, float]]] = None,
                 **overrides: Any) -> None:
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
        if isinstance(router_loss_weights, Mapping):
            router_loss_weights = RouterLossWeights(**router_loss_weights)
        self.router_loss_weights = router_loss_weights or RouterLossWeights()

    def forward_features(self, x: torch.Tensor, return_routing: bool = False):
        feats, routing = self.backbone(x, return_routing=True)
        last = next(reversed(feats.values()))
        return (last, routing) if return_routing else last

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.spp(feat)))

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        if return_routing:
            feat, routing = self.forward_features(x, True)
            return self.forward_head(feat), routing
        return self.forward_head(self.backbone(x)[self.backbone.feature_info[-1]["name"]])

    def losses(self, images: torch.Tensor, targets: torch.Tensor,
               label_smoothing: float = 0.0) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Cross-entropy plus the weighted router losses. Returns ``(losses, logits)``; the total is
        ``sum(losses.values())``."""
        logits, routing = self(images, return_routing=True)
        out = {"loss_cls": F.cross_entropy(logits, targets, label_smoothing=label_smoothing)}
        if routing:
            out["loss_router"] = router_loss(routing, self.router_loss_weights).to(logits.device)
        return out, logits

    # timm-style accessors
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> PCEClassifier:
    """``build_classifier("pce_fmnist", 10, router="gate")``: a backbone preset with an SPP + FC head.
    Head options (``spp_levels``, ``spp_mode``, ``dropout``, ``router_loss_weights``) are taken from ``kwargs``;
    the rest are backbone overrides."""
    head_keys = {"spp_levels", "spp_mode", "dropout", "router_loss_weights"}
    head = {k: kwargs.pop(k) for k in list(kwargs) if k in head_keys}
    return PCEClassifier(name, num_classes, **head, **kwargs)
