"""PatchConvMoE's gate: a few 3x3 convolutions on each patch, global average pooling, a linear layer to E logits."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from pce.moe.routing import Router
from pce.registry import ROUTERS


class GapConvScorer(nn.Module):
    """Logits ``[B, P, E]`` of patches ``[B, P, C, n, n]``: ``num_convs`` x (3x3 conv, ReLU) at width ``hidden``,
    global average pooling, one linear layer. The linear head is ``mlp[-1]`` (the layout of the gate router's
    scorer, so :mod:`pce.analysis.surgery` prunes and duplicates its rows the same way)."""

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 32, num_convs: int = 2) -> None:
        super().__init__()
        if num_convs < 0 or hidden < 1:
            raise ValueError(f"gap_conv needs num_convs >= 0 and hidden >= 1, got {num_convs}, {hidden}")
        self.in_channels = in_channels
        layers = []
        for i in range(num_convs):
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(hidden if num_convs else in_channels, num_experts))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        B, P, C, n, m = patches.shape
        if C != self.in_channels:
            raise ValueError(f"gap_conv router expects {self.in_channels} patch channels, got {C}")
        h = self.convs(patches.reshape(B * P, C, n, m)).mean((2, 3))  # [B * P, hidden]
        return self.mlp(h).reshape(B, P, -1)


@ROUTERS.register("gap_conv")
class GapConvRouter(Router):
    """Convolutional gate (PatchConvMoE): ``num_convs`` 3x3 convolutions with ReLU (width ``hidden``) on every
    patch, global average pooling, a linear layer to ``E`` logits, softmax; top-k / renormalisation / capacity
    from :meth:`Router.finalize`. ``noise_std`` adds Gaussian noise to the logits in training (noisy top-k).
    Positions are not used (give the layer positional channels to route by position)."""

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 32, num_convs: int = 2,
                 top_k: Optional[int] = None, renormalize: Union[bool, str] = False,
                 capacity_factor: Optional[float] = None, noise_std: float = 0.0) -> None:
        super().__init__(num_experts, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.scorer = GapConvScorer(in_channels, num_experts, hidden, num_convs)
        self.noise_std = noise_std

    def score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``patches [B, P, C, n, n]``, ``positions [P, 2]`` (unused) -> logits ``[B, P, E]``."""
        logits = self.scorer(patches)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits
