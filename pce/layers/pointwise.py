"""A 1x1 convolution that avoids PyTorch's slowest CPU path for its shape.

On CPU, PyTorch sends a 1x1 convolution with a batch under 16 on one thread to its native kernel, which for tiny
maps with many channels is very slow: ``[8, 256, 2, 2] -> 256`` channels took 411 us there against 57 us as one
matrix product over the pixels (``F.linear`` on the channels-last view). Everywhere else oneDNN's convolution was
as fast or faster than matrix-product formulations (up to 2.2x on 56x56 maps). Measured forward and forward +
backward with 1 and 2 threads on this project's 2-core CPU (``docs/BENCHMARKS.md``). Same parameters and
state-dict keys as ``nn.Conv2d(cin, cout, 1)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pce.layers.fx import fx_leaf


class PointwiseConv(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``: ``[B, C, H, W] -> [B, O, H, W]``; small batches of maps under
    16 pixels run as one matrix product over all pixels."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    @fx_leaf  # its fast path branches on the device and shape: one node in FX graphs, like nn.Conv2d
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not under capture: a branch on the batch size would pin a dynamic batch of torch.export to 1..15
        capturing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if (not capturing and x.device.type == "cpu" and x.dim() == 4 and x.shape[0] < 16
                and x.shape[2] * x.shape[3] < 16):
            y = F.linear(x.permute(0, 2, 3, 1), self.weight.view(self.out_channels, -1), self.bias)
            return y.permute(0, 3, 1, 2).contiguous()
        return F.conv2d(x, self.weight, self.bias)
