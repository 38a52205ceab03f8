"""Spatial Pyramid Pooling: a fixed-length embedding from a map of any size."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SpatialPyramidPooling(nn.Module):
    """``[N, C, h, w] -> [N, C * sum(l * l for l in levels)]`` by adaptive pooling at each level.

    ``mode`` is ``"avg"`` or ``"max"``. Level order is coarse to fine; within a level, row-major.
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "avg") -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"SPP mode must be 'avg' or 'max', got {mode!r}")
        if not levels or any(int(l) < 1 for l in levels):
            raise ValueError(f"SPP levels must be positive integers, got {levels!r}")
        self.levels = tuple(int(l) for l in levels)
        self.mode = mode

    def output_dim(self, channels: int) -> int:
        return channels * sum(l * l for l in self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if self.mode == "avg" else F.adaptive_max_pool2d
        return torch.cat([pool(x, l).flatten(1) for l in self.levels], dim=1)
