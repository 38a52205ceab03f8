"""Deformable attention between PCE layers (seeds 003/004: context across patches), DAT-style.

Every pixel attends to a small set of keys/values sampled with ``grid_sample`` at reference points on a
``stride``-coarser grid, each moved by a learned offset (bounded by ``offset_range`` grid cells). Multi-head.
A per-channel layer scale ``gamma`` (init ``layer_scale_init``) makes the block start as (near) identity, so
it can be switched on mid-training (the attention phase) without disturbing the network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pce.layers.fx import fx_leaf


class DeformableAttention(nn.Module):
    """``[B, C, H, W] -> [B, C, H, W]``: ``x + gamma * Attn(x)``; identity when disabled."""

    def __init__(self, channels: int, num_heads: int = 4, offset_groups: int = 1, stride: int = 2,
                 offset_range: float = 2.0, offset_kernel: int = 3, layer_scale_init: float = 1e-2) -> None:
        super().__init__()
        if channels % num_heads or channels % offset_groups:
            raise ValueError(f"channels={channels} must be divisible by num_heads={num_heads} "
                             f"and offset_groups={offset_groups}")
        self.channels, self.num_heads, self.groups = channels, num_heads, offset_groups
        self.stride, self.offset_range = stride, offset_range
        gc = channels // offset_groups
        self.q = nn.Conv2d(channels, channels, 1)
        self.offset = nn.Sequential(
            nn.Conv2d(gc, gc, offset_kernel, stride=stride, padding=offset_kernel // 2, groups=gc),
            nn.GELU(), nn.Conv2d(gc, 2, 1, bias=False),
        )
        nn.init.zeros_(self.offset[-1].weight)  # start at the reference points
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init)))
        self.enabled = True

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.num_heads}, stride={self.stride}, enabled={self.enabled}"

    def sample_points(self, q: torch.Tensor) -> torch.Tensor:
        """Sampling locations ``[B*G, Hr, Wr, 2]`` (x, y in [-1, 1]) from queries ``[B, C, H, W]``."""
        B, C, H, W = q.shape
        off = self.offset(q.reshape(B * self.groups, C // self.groups, H, W))  # [BG, 2, Hr, Wr]
        Hr, Wr = off.shape[-2:]
        ys = (torch.arange(Hr, device=q.device, dtype=q.dtype) + 0.5) / Hr * 2 - 1
        xs = (torch.arange(Wr, device=q.device, dtype=q.dtype) + 0.5) / Wr * 2 - 1
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [Hr, Wr, 2] as (x, y)
        scale = q.new_tensor([2.0 * self.offset_range / Wr, 2.0 * self.offset_range / Hr])
        return (ref + off.permute(0, 2, 3, 1).tanh() * scale).clamp(-1, 1)

    @fx_leaf  # one node in FX graphs, so that set_attention_enabled still acts on a traced model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``."""
        if not self.enabled:
            return x
        B, C, H, W = x.shape
        q = self.q(x)
        pts = self.sample_points(q)
        sampled = F.grid_sample(x.reshape(B * self.groups, C // self.groups, H, W), pts,
                                mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.reshape(B, C, *pts.shape[1:3])
        h, d = self.num_heads, C // self.num_heads
        qh = q.reshape(B, h, d, H * W).transpose(2, 3)
        kh = self.k(sampled).reshape(B, h, d, -1).transpose(2, 3)
        vh = self.v(sampled).reshape(B, h, d, -1).transpose(2, 3)
        att = F.scaled_dot_product_attention(qh, kh, vh)  # [B, h, HW, d]
        y = self.out(att.transpose(2, 3).reshape(B, C, H, W))
        return x + self.gamma.view(1, -1, 1, 1) * y
