"""Positional channels added to feature maps before patch extraction.

For a map split into a ``grid_h x grid_w`` grid of ``n x n`` patches, every pixel gets
(patch_y, patch_x, pixel_y, pixel_x): the absolute position of its patch in the grid and its relative
position inside the patch, each normalised to [-1, 1] (CoordConv style). Optional Fourier features add
``sin(2^k * pi * c), cos(2^k * pi * c)`` for each of the four coordinates and ``k < num_frequencies``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _linspace(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``n`` evenly spaced values in [-1, 1] (a single value is 0)."""
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def patch_coordinates(
    grid_h: int, grid_w: int, patch_h: int, patch_w: int,
    device: torch.device | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinate channels ``[4, grid_h * patch_h, grid_w * patch_w]``: patch_y, patch_x, pixel_y, pixel_x."""
    gy = _linspace(grid_h, device, dtype).repeat_interleave(patch_h)
    gx = _linspace(grid_w, device, dtype).repeat_interleave(patch_w)
    py = _linspace(patch_h, device, dtype).repeat(grid_h)
    px = _linspace(patch_w, device, dtype).repeat(grid_w)
    H, W = gy.numel(), gx.numel()
    return torch.stack([
        gy[:, None].expand(H, W), gx[None, :].expand(H, W),
        py[:, None].expand(H, W), px[None, :].expand(H, W),
    ])


def patch_centers(grid_h: int, grid_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (y, x) position of every patch, ``[grid_h * grid_w, 2]``, row-major like extraction."""
    gy = _linspace(grid_h, device, dtype)
    gx = _linspace(grid_w, device, dtype)
    return torch.stack(torch.meshgrid(gy, gx, indexing="ij"), dim=-1).reshape(-1, 2)


class PositionalEncoding(nn.Module):
    """Builds the positional channels for a patch grid.

    ``kind="coord"``: the 4 coordinate channels. ``kind="fourier"``: the coordinates plus
    ``8 * num_frequencies`` sine/cosine channels. ``kind="none"``: no channels.
    Output ``[1, num_channels, grid_h * patch_h, grid_w * patch_w]`` (cached per size and device in eager runs;
    computed afresh, the cache neither read nor filled, under ``torch.jit.trace``, so that every trace of a model
    records the same graph whatever ran before it: ``check_trace`` traces twice and compares).
    """

    KINDS = ("coord", "fourier", "none")

    def __init__(self, kind: str = "coord", num_frequencies: int = 4) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"positional encoding kind must be one of {self.KINDS}, got {kind!r}")
        if kind == "fourier" and num_frequencies < 1:
            raise ValueError(f"fourier positional encoding needs num_frequencies >= 1, got {num_frequencies}")
        self.kind = kind
        self.num_frequencies = num_frequencies if kind == "fourier" else 0
        self._cache: dict = {}

    @property
    def num_channels(self) -> int:
        if self.kind == "none":
            return 0
        return 4 + 8 * self.num_frequencies

    def forward(self, grid_h: int, grid_w: int, patch_h: int, patch_w: int,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        tracing = torch.jit.is_tracing()
        key = (grid_h, grid_w, patch_h, patch_w, str(device), dtype)
        cached = None if tracing else self._cache.get(key)
        if cached is not None:
            return cached
        coords = patch_coordinates(grid_h, grid_w, patch_h, patch_w, device, dtype)
        if self.kind == "fourier":
            freqs = (2.0 ** torch.arange(self.num_frequencies, device=device, dtype=dtype)) * math.pi
            ang = coords[:, None] * freqs[None, :, None, None]  # [4, F, H, W]
            # channel 4 + c*F + k: sin(2^k pi coord_c); channel 4 + 4F + c*F + k: the cosine
            feats = torch.cat([ang.sin().flatten(0, 1), ang.cos().flatten(0, 1)], dim=0)
            coords = torch.cat([coords, feats], dim=0)
        out = coords.unsqueeze(0)
        if self.kind == "none":
            out = out[:, :0]
        if tracing:
            return out
        if len(self._cache) > 32:
            self._cache.clear()
        self._cache[key] = out
        return out
