"""A 1x1 convolution that picks the faster CPU kernel for its shape.

Projections to a few channels over many small patches (the routers': ``C + 4 -> 8`` channels on ``B * P``
patches) run 2-2.5x faster as a batched matrix product ``W @ x.view(B, C, H*W)`` than through oneDNN; for
channel-preserving projections (the PCE layers' and their dense twins' output projections) oneDNN's convolution
is as fast or much faster (up to 15x on ``[64, 256, 2, 2]``, where the batched product degenerates into 64 tiny
products). Measured with 1 and 2 threads on this project's 2-core CPU (see docs/BENCHMARKS.md). Same parameters and
state-dict keys as ``nn.Conv2d(cin, cout, 1)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` whose forward is a batched matmul: ``[B, C, H, W] -> [B, O, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape if x.dim() == 4 else (0, 0, 0, 0)
        if x.device.type != "cpu" or x.dim() != 4 or self.out_channels * 4 > C or H * W < 16:
            return F.conv2d(x, self.weight, self.bias)
        y = torch.matmul(self.weight.view(self.out_channels, C), x.reshape(B, C, H * W))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(B, self.out_channels, H, W)
