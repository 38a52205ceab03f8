"""A 1x1 convolution computed as a batched matrix product.

On CPU, oneDNN and PyTorch's fallback path are slow for 1x1 convolutions on small batches of small maps (the
routers' projections over many patches, the PCE layers' output projections): ``W @ x.view(B, C, H*W)`` was
1-2.5x faster in our measurements. Same parameters and state-dict keys as ``nn.Conv2d(cin, cout, 1)``.
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
        if x.device.type != "cpu" or x.dim() != 4:
            return F.conv2d(x, self.weight, self.bias)
        B, C, H, W = x.shape
        y = torch.matmul(self.weight.view(self.out_channels, C), x.reshape(B, C, H * W))
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(B, self.out_channels, H, W)
