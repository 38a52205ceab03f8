"""Patch extraction and reassembly: ``[B, C, H, W] <-> [B, P, C, n, n]``.

Patches are taken row-major over a ``grid_h x grid_w`` grid. With ``stride == patch_size`` they tile the
map and :meth:`PatchExtractor.reassemble` is the exact inverse of :meth:`PatchExtractor.extract`; with
``stride < patch_size`` neighbouring patches overlap and reassembly averages the overlapping pixels.

Policy for maps whose size does not fit the patch grid (``padding``):
* ``"error"`` (default of the extractor): raise a ``ValueError`` naming the size and the patch size;
* ``"pad"``: zero-pad bottom/right to the next size that fits, and :meth:`reassemble` crops back;
* ``"fit"`` (non-overlapping patches): keep the number of patches ``ceil(size / n)`` per side and shrink the
  patches to tile the map exactly when they can (a 56x56 map with ``n = 16``: 4x4 patches of 14, where
  ``"pad"`` would compute on 64x64, 1.31x the pixels); otherwise, and for maps smaller than one patch, pad
  as ``"pad"`` does. The grid's ``patch_size`` is the side actually used.
Nothing is ever silently truncated.

The other kind of grid, a fixed number of rectangular cells of uneven sides (:class:`pce.PCEConv2d`'s), is in
:mod:`pce.layers.cells`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of one extraction: input size, padded size and the patch grid."""

    height: int
    width: int
    patch_size: int
    stride: int
    pad_h: int
    pad_w: int
    grid_h: int
    grid_w: int

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.height + self.pad_h, self.width + self.pad_w

    @property
    def overlapping(self) -> bool:
        return self.stride != self.patch_size


def _fit(size: int, patch: int, stride: int) -> int:
    """Smallest size >= ``size`` covered exactly by windows of ``patch`` every ``stride``."""
    if size <= patch:
        return patch
    return patch + math.ceil((size - patch) / stride) * stride


class PatchExtractor(nn.Module):
    """Splits a map into ``n x n`` patches and puts them back.

    Args:
        patch_size: side ``n`` of a square patch.
        stride: step between patches (default ``patch_size``: no overlap; smaller values overlap).
        padding: ``"error"`` or ``"pad"`` (see module docstring).
    """

    def __init__(self, patch_size: int, stride: int | None = None, padding: str = "error") -> None:
        super().__init__()
        stride = patch_size if stride is None else stride
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if not 1 <= stride <= patch_size:
            raise ValueError(f"stride must be in [1, patch_size={patch_size}], got {stride}")
        if padding not in ("error", "pad", "fit"):
            raise ValueError(f"padding must be 'error', 'pad' or 'fit', got {padding!r}")
        self.patch_size = patch_size
        self.stride = stride
        self.padding = padding

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, stride={self.stride}, padding={self.padding!r}"

    def grid(self, height: int, width: int) -> PatchGrid:
        """The patch grid for a ``height x width`` map (raises under ``padding="error"`` if it does not fit)."""
        n, s = self.patch_size, self.stride
        if self.padding == "fit" and s == n and (height % n or width % n) and min(height, width) >= n:
            gh, gw = math.ceil(height / n), math.ceil(width / n)
            if height % gh == 0 and width % gw == 0 and height // gh == width // gw:
                m = height // gh
                return PatchGrid(height, width, m, m, 0, 0, gh, gw)
        ph, pw = _fit(height, n, s), _fit(width, n, s)
        if (ph, pw) != (height, width) and self.padding == "error":
            raise ValueError(
                f"feature map {height}x{width} does not fit patches of {n} with stride {s} "
                f"(needs {ph}x{pw}); resize the input or use padding='pad'"
            )
        return PatchGrid(height, width, n, s, ph - height, pw - width, (ph - n) // s + 1, (pw - n) // s + 1)

    def pad(self, x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """Zero-pad ``[B, C, H, W]`` bottom/right to the grid's padded size (no-op if already padded)."""
        if (grid.pad_h or grid.pad_w) and tuple(x.shape[-2:]) == (grid.height, grid.width):
            x = F.pad(x, (0, grid.pad_w, 0, grid.pad_h))
        return x

    def extract(self, x: torch.Tensor, grid: PatchGrid | None = None) -> tuple[torch.Tensor, PatchGrid]:
        """``[B, C, H, W] -> ([B, P, C, n, n], grid)``."""
        if x.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] map, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        grid = grid or self.grid(H, W)
        x = self.pad(x, grid)
        n = grid.patch_size
        if not grid.overlapping:
            p = x.reshape(B, C, grid.grid_h, n, grid.grid_w, n).permute(0, 2, 4, 1, 3, 5)
            return p.reshape(B, grid.num_patches, C, n, n), grid
        cols = F.unfold(x, kernel_size=n, stride=grid.stride)  # [B, C*n*n, P]
        return cols.transpose(1, 2).reshape(B, grid.num_patches, C, n, n), grid

    def reassemble(self, patches: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """``[B, P, C, n, n] -> [B, C, H, W]``: exact inverse without overlap, mean of overlaps otherwise."""
        B, P, C, n, n2 = patches.shape
        if P != grid.num_patches or n != grid.patch_size or n2 != n:
            raise ValueError(
                f"patches {tuple(patches.shape)} do not match grid {grid.grid_h}x{grid.grid_w} of size {grid.patch_size}"
            )
        Hp, Wp = grid.padded_size
        if not grid.overlapping:
            x = patches.reshape(B, grid.grid_h, grid.grid_w, C, n, n).permute(0, 3, 1, 4, 2, 5)
            x = x.reshape(B, C, Hp, Wp)
        else:
            cols = patches.reshape(B, P, C * n * n).transpose(1, 2)
            summed = F.fold(cols, (Hp, Wp), kernel_size=n, stride=grid.stride)
            ones = torch.ones(1, n * n, P, device=patches.device, dtype=patches.dtype)
            count = F.fold(ones, (Hp, Wp), kernel_size=n, stride=grid.stride)
            x = summed / count
        return x[:, :, : grid.height, : grid.width]

    def extract_windows(self, x: torch.Tensor, grid: PatchGrid, halo: int) -> torch.Tensor:
        """Patches with ``halo`` pixels of neighbour context on every side: ``[B, P, C, n+2h, n+2h]``.

        Context outside the (padded) map is zero. ``halo=0`` equals :meth:`extract`.
        """
        if halo < 0:
            raise ValueError(f"halo must be >= 0, got {halo}")
        if halo == 0:
            return self.extract(x, grid)[0]
        B, C = x.shape[:2]
        x = F.pad(self.pad(x, grid), (halo, halo, halo, halo))
        k = grid.patch_size + 2 * halo
        cols = F.unfold(x, kernel_size=k, stride=grid.stride)
        return cols.transpose(1, 2).reshape(B, grid.num_patches, C, k, k)
