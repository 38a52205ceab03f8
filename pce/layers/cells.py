"""Cell grids: a fixed number of rectangular cells whose sides may differ by one pixel, and where the cells of a
convolution's output read its input (the geometry of :class:`pce.PCEConv2d`).

* :func:`cell_bounds` / :class:`CellGrid`: ``round(i * size / parts)`` borders, so any map splits into e.g. 3x3
  patches without padding (17 rows in 3: 6, 5, 6); per-cell values expanded to pixels, cell buffers placed on the map;
* :class:`CellWindows`: per cell of an output grid, its input window, receptive field and own input pixels along one
  axis; :func:`gather_windows` cuts the windows of a padded map;
* :func:`conv_pads`: ``nn.Conv2d``'s padding argument as ``(top, bottom, left, right)``.

Unlike :class:`~pce.layers.patches.PatchGrid` (equal ``n x n`` patches, padded to fit), cells always tile the map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["cell_bounds", "CellGrid", "CellWindows", "gather_windows", "conv_pads"]

IntPair = Union[int, Tuple[int, int]]


def conv_pads(padding: Union[str, IntPair], kernel: Tuple[int, int], stride: Tuple[int, int],
              dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``nn.Conv2d``'s padding (int, pair, ``"valid"``, ``"same"``) as ``(top, bottom, left, right)``; ``"same"``
    puts the odd pixel bottom/right, as PyTorch does."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        (top, left), (kh, kw) = [(d * (k - 1)) // 2 for d, k in zip(dilation, kernel)], kernel
        return top, dilation[0] * (kh - 1) - top, left, dilation[1] * (kw - 1) - left
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


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

    Unlike :class:`~pce.layers.patches.PatchGrid`, cells may differ in size (by one pixel with :meth:`split`), so a
    fixed number of patches fits any map without padding: :meth:`split` (``grid=(gh, gw)``) or :meth:`tiles` (cells
    of at most ``n``: ``ceil(H / n) x ceil(W / n)`` of them, split as evenly). Used by :class:`pce.PCEConv2d` on its
    output map.
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
        side with ``n = 16``: 4 cells of 14, as :class:`~pce.layers.patches.PatchExtractor`'s ``"fit"``; 14 with
        ``n = 4``: 4, 3, 4, 3)."""
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
        if torch.jit.is_tracing():  # torch.jit.trace (fvcore's FLOP count) cannot record a custom Function
            return _place_cells(cells, rows, cols)
        return _PlaceCells.apply(cells, rows, cols)


def _place_cells(cells: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
    """:class:`_PlaceCells`'s forward with autograd's own slicing."""
    B, P, C, ch, cw = cells.shape
    c = cells.reshape(B, len(rows), len(cols), C, ch, cw)
    return torch.cat([torch.cat([c[:, i, j, :, :h, :w] for j, (_, w) in enumerate(cols)], 3)
                      for i, (_, h) in enumerate(rows)], 2)


class _PlaceCells(torch.autograd.Function):
    """:meth:`CellGrid.place` for uneven cells: slices and concatenations (far faster than ``index_select`` on CPU);
    the backward copies the map's gradient into one buffer (autograd's slicing would allocate a zero-filled
    gradient of the whole buffer per cell)."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor, rows: list, cols: list) -> torch.Tensor:
        ctx.rows, ctx.cols, ctx.shape = rows, cols, cells.shape
        return _place_cells(cells, rows, cols)

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
    # torch.jit.trace (fvcore's FLOP count) cannot record a custom autograd Function: plain slicing there
    cut = _cut_boxes if torch.jit.is_tracing() else _CutBoxes.apply
    if which is None:
        return cut(x, [(None, rows.starts[p // gw], cols.starts[p % gw]) for p in range(P)], size, 1)
    return cut(x, [(t // P, rows.starts[t % P // gw], cols.starts[t % P % gw]) for t in which], size, 0)


def _cut_boxes(x: torch.Tensor, boxes: list, size: Tuple[int, int], dim: int) -> torch.Tensor:
    """The boxes of :class:`_CutBoxes` with autograd's own slicing (its forward)."""
    h, w = size
    out = []
    for b, r, c in boxes:
        box = (x if b is None else x[b])[..., r:r + h, c:c + w]
        if box.shape[-2:] != (h, w):
            box = F.pad(box, (0, w - box.shape[-1], 0, h - box.shape[-2]))
        out.append(box)
    return torch.stack(out, dim)


class _CutBoxes(torch.autograd.Function):
    """Boxes ``(b, r, c)`` of ``x [B, C, H, W]`` of ``size`` pixels stacked along ``dim``: ``x[:, :, r:, c:]`` when
    ``b`` is ``None``, else ``x[b, :, r:, c:]``; zero-filled past the map. The backward adds every box's gradient into
    one buffer (autograd's slicing would allocate a zero-filled gradient of the whole map per box)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, boxes: list, size: Tuple[int, int], dim: int) -> torch.Tensor:
        ctx.boxes, ctx.size, ctx.dim, ctx.shape = boxes, size, dim, x.shape
        return _cut_boxes(x, boxes, size, dim)

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
