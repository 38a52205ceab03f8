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

:class:`CellGrid` is the other kind of grid: a fixed number of rectangular cells whose sides may differ by one
pixel (``round(i * size / parts)`` borders), so any map splits into e.g. 3x3 patches without padding;
:class:`CellWindows` says which input pixels each cell of a convolution's output reads (:class:`pce.PCEConv2d`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

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


# -- cell grids: a fixed number of (possibly uneven) rectangular cells --------------------------------------------
def cell_bounds(size: int, parts: int) -> Tuple[int, ...]:
    """``parts + 1`` borders ``round(i * size / parts)`` (halves rounded up) splitting ``size`` pixels into
    ``parts`` cells whose sides differ by at most one pixel (17 in 3: 6, 5, 6). ``parts`` is capped at ``size``
    (a map smaller than the grid gets one cell per pixel), so no cell is ever empty."""
    if size < 1 or parts < 1:
        raise ValueError(f"cell_bounds needs size >= 1 and parts >= 1, got size={size}, parts={parts}")
    parts = min(parts, size)
    return tuple((2 * i * size + parts) // (2 * parts) for i in range(parts + 1))


@dataclass(frozen=True)
class CellGrid:
    """A map of ``height x width`` pixels cut into ``grid_h x grid_w`` rectangular cells (row-major), given by
    their borders: cell ``(i, j)`` covers rows ``rows[i]:rows[i + 1]`` and columns ``cols[j]:cols[j + 1]``.

    Unlike :class:`PatchGrid`, cells may differ in size (by one pixel with :meth:`split`), so a fixed number of
    patches fits any map without padding: :meth:`split` (``grid=(gh, gw)``) or :meth:`tiles` (cells of at most
    ``n``: ``ceil(H / n) x ceil(W / n)`` of them, split as evenly). Used by :class:`pce.PCEConv2d` on its output map.
    """

    rows: Tuple[int, ...]
    cols: Tuple[int, ...]

    @classmethod
    def split(cls, height: int, width: int, grid_h: int, grid_w: int) -> "CellGrid":
        """``grid_h x grid_w`` cells (fewer on a side shorter than the grid), borders by :func:`cell_bounds`."""
        return cls(cell_bounds(height, grid_h), cell_bounds(width, grid_w))

    @classmethod
    def tiles(cls, height: int, width: int, patch_size: int) -> "CellGrid":
        """Cells of at most ``patch_size``: ``ceil(height / n) x ceil(width / n)`` of them, split evenly (a 56-pixel
        side with ``n = 16``: 4 cells of 14, as :class:`PatchExtractor`'s ``"fit"``; 14 with ``n = 4``: 4, 3, 4, 3)."""
        return cls.split(height, width, math.ceil(height / patch_size), math.ceil(width / patch_size))

    @property
    def grid_h(self) -> int:
        return len(self.rows) - 1

    @property
    def grid_w(self) -> int:
        return len(self.cols) - 1

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def height(self) -> int:
        return self.rows[-1]

    @property
    def width(self) -> int:
        return self.cols[-1]

    @property
    def cell_h(self) -> int:
        """The tallest cell's height (cells are computed on ``cell_h x cell_w`` buffers, then cropped)."""
        return max(b - a for a, b in zip(self.rows, self.rows[1:]))

    @property
    def cell_w(self) -> int:
        return max(b - a for a, b in zip(self.cols, self.cols[1:]))

    @property
    def square_side(self) -> Optional[int]:
        """The side when every cell is the same square, else ``None``."""
        sides = {b - a for a, b in zip(self.rows, self.rows[1:])} | {b - a for a, b in zip(self.cols, self.cols[1:])}
        return sides.pop() if len(sides) == 1 else None

    def _sizes(self, bounds: Tuple[int, ...]) -> list:
        return [(a, b - a) for a, b in zip(bounds, bounds[1:])]

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-cell values ``[B, P, K]`` -> per-pixel ``[B, K, H, W]`` (each pixel gets its cell's values)."""
        B, P, K = values.shape
        if P != self.num_patches:
            raise ValueError(f"values {tuple(values.shape)} do not match a {self.grid_h}x{self.grid_w} cell grid")
        v = values.reshape(B, self.grid_h, self.grid_w, K).permute(0, 3, 1, 2)  # [B, K, gh, gw]
        v = torch.cat([v[:, :, i:i + 1].expand(-1, -1, h, -1) for i, (_, h) in enumerate(self._sizes(self.rows))], 2)
        return torch.cat([v[..., j:j + 1].expand(-1, -1, -1, w) for j, (_, w) in enumerate(self._sizes(self.cols))], 3)

    def place(self, cells: torch.Tensor) -> torch.Tensor:
        """Cell buffers ``[B, P, C, cell_h, cell_w]`` (cell ``(i, j)`` in the top-left ``h_i x w_j`` corner of
        its buffer) -> the map ``[B, C, H, W]``; the rest of each buffer is dropped."""
        B, P, C, ch, cw = cells.shape
        if P != self.num_patches or ch < self.cell_h or cw < self.cell_w:
            raise ValueError(f"cells {tuple(cells.shape)} do not fit a {self.grid_h}x{self.grid_w} cell grid "
                             f"of cells up to {self.cell_h}x{self.cell_w}")
        rows, cols = self._sizes(self.rows), self._sizes(self.cols)
        if all(h == ch for _, h in rows) and all(w == cw for _, w in cols):  # equal cells: one permutation
            m = cells.reshape(B, self.grid_h, self.grid_w, C, ch, cw).permute(0, 3, 1, 4, 2, 5)
            return m.reshape(B, C, self.height, self.width)
        return _PlaceCells.apply(cells, rows, cols)


class _PlaceCells(torch.autograd.Function):
    """:meth:`CellGrid.place` for uneven cells: slices and concatenations (far faster than ``index_select`` on CPU);
    the backward copies the map's gradient into one buffer (autograd's slicing would allocate a zero-filled
    gradient of the whole buffer per cell)."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
        ctx.rows, ctx.cols, ctx.shape = rows, cols, cells.shape
        B, P, C, ch, cw = cells.shape
        c = cells.reshape(B, len(rows), len(cols), C, ch, cw)
        return torch.cat([torch.cat([c[:, i, j, :, :h, :w] for j, (_, w) in enumerate(cols)], 3)
                          for i, (_, h) in enumerate(rows)], 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        B, P, C, ch, cw = ctx.shape
        g = grad.new_zeros(B, len(ctx.rows), len(ctx.cols), C, ch, cw)
        for i, (r, h) in enumerate(ctx.rows):
            for j, (c, w) in enumerate(ctx.cols):
                g[:, i, j, :, :h, :w] = grad[:, :, r:r + h, c:c + w]
        return g.reshape(ctx.shape), None, None


class CellWindows(NamedTuple):
    """Where the cells of an output grid read a convolution's input, along one axis.

    For output borders ``bounds`` of a convolution (kernel ``k``, stride ``s``, dilation ``d``, ``pad`` pixels of
    padding before an input side of ``size`` pixels), per cell ``i``:

    * ``starts[i]``: its window's first pixel in the padded input; ``span``: the window length, the receptive field
      of the largest cell (a valid convolution of the window gives ``cell_h`` outputs);
    * ``field[i]``: its receptive field ``[a, b)`` in input coordinates (may reach into the padding);
    * ``own[i]``: its own input pixels ``[a, b)``, those under its outputs' receptive-field centres
      (``r_i * s + d (k - 1) // 2 - pad`` onwards): a partition of ``[0, size)``.
    """

    starts: Tuple[int, ...]
    span: int
    field: Tuple[Tuple[int, int], ...]
    own: Tuple[Tuple[int, int], ...]
    pad: int

    @classmethod
    def of(cls, bounds: Sequence[int], size: int, k: int, s: int, d: int, pad: int) -> "CellWindows":
        cell = max(b - a for a, b in zip(bounds, bounds[1:]))
        field = tuple((a * s - pad, (b - 1) * s - pad + d * (k - 1) + 1) for a, b in zip(bounds, bounds[1:]))
        c0 = d * (k - 1) // 2 - pad
        borders = [0] + [min(max(a * s + c0, 0), size) for a in bounds[1:-1]] + [size]
        return cls(tuple(a * s for a in bounds[:-1]), (cell - 1) * s + d * (k - 1) + 1, field,
                   tuple(zip(borders, borders[1:])), pad)

    def own_mask(self, device: torch.device) -> torch.Tensor:
        """``[cells, span]`` bool: which pixels of each window are the cell's own (``own``, input coordinates)."""
        idx = torch.tensor(self.starts, device=device)[:, None] + torch.arange(self.span, device=device) - self.pad
        a = torch.tensor([o[0] for o in self.own], device=device)[:, None]
        b = torch.tensor([o[1] for o in self.own], device=device)[:, None]
        return (idx >= a) & (idx < b)


def gather_windows(x: torch.Tensor, rows: CellWindows, cols: CellWindows,
                   which: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The windows of ``x [B, C, H, W]`` (a padded map) at every (row window, column window) pair ->
    ``[B, gh * gw, C, rows.span, cols.span]``, row-major as cells are numbered; or, given ``which`` (indices
    ``b * P + p``), those windows only, ``[len(which), C, rows.span, cols.span]``. Windows reaching past the map
    are zero-filled there (those pixels only feed outputs past a smaller cell, which are cropped). Slices and
    one stack: far faster than ``index_select`` on the spatial dimensions."""
    gw = len(cols.starts)
    P = len(rows.starts) * gw
    size = (rows.span, cols.span)
    if which is None:
        return _CutBoxes.apply(x, [(None, rows.starts[p // gw], cols.starts[p % gw]) for p in range(P)], size, 1)
    return _CutBoxes.apply(x, [(t // P, rows.starts[t % P // gw], cols.starts[t % P % gw]) for t in which], size, 0)


class _CutBoxes(torch.autograd.Function):
    """Boxes ``(b, r, c)`` of ``x [B, C, H, W]`` of ``size`` pixels stacked along ``dim``: ``x[:, :, r:, c:]`` when
    ``b`` is ``None``, else ``x[b, :, r:, c:]``; zero-filled past the map. The backward adds every box's gradient into
    one buffer (autograd's slicing would allocate a zero-filled gradient of the whole map per box)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, boxes: list, size: Tuple[int, int], dim: int) -> torch.Tensor:
        ctx.boxes, ctx.size, ctx.dim, ctx.shape = boxes, size, dim, x.shape
        h, w = size
        out = []
        for b, r, c in boxes:
            box = (x if b is None else x[b])[..., r:r + h, c:c + w]
            if box.shape[-2:] != (h, w):
                box = F.pad(box, (0, w - box.shape[-1], 0, h - box.shape[-2]))
            out.append(box)
        return torch.stack(out, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.new_zeros(ctx.shape)
        H, W = ctx.shape[-2:]
        h, w = ctx.size
        for k, (b, r, c) in enumerate(ctx.boxes):
            hh, ww = min(h, H - r), min(w, W - c)
            target = (g if b is None else g[b])[..., r:r + hh, c:c + ww]
            target += grad.select(ctx.dim, k)[..., :hh, :ww]
        return g, None, None, None
