"""One feature map seen as a patch grid: the padded map, its patches, positional channels and patch centres.

Built once per forward by :class:`~pce.models.layer.PCELayer` and handed to the router
(:meth:`pce.moe.routing.Router.route`) and to the execution strategy (:mod:`pce.moe.execution`), so that
neither re-derives the geometry. Patches are cut lazily: a strategy that works on the whole map never pays
for them.

:func:`region_view` builds the same view over regions of a map pooled to a fixed size (what
:class:`pce.PCEConv2d`'s router reads about each of its cells).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.positional import PositionalEncoding, patch_centers


class PatchedMap:
    """``x [B, C, H, W]`` cut by ``extractor`` into ``P = grid_h * grid_w`` patches of ``n x n``.

    Attributes:
        x: the input map; ``padded``: ``[B, C, Hp, Wp]`` (bottom/right zero padding, or ``x`` itself).
        grid: the :class:`~pce.layers.patches.PatchGrid`; ``positions``: patch centres ``[P, 2]`` in [-1, 1] (lazy).
        pos_map: positional channels ``[1, Pc, grid_h * n, grid_w * n]`` (``Pc`` may be 0).
    """

    def __init__(self, x: torch.Tensor, extractor: PatchExtractor, pos: PositionalEncoding) -> None:
        self.x, self.extractor = x, extractor
        self.grid: PatchGrid = extractor.grid(x.shape[-2], x.shape[-1])
        g, n = self.grid, self.grid.patch_size
        self.padded = extractor.pad(x, g)
        self.pos_map = pos(g.grid_h, g.grid_w, n, n, x.device, x.dtype)
        self._positions: Optional[torch.Tensor] = None
        self._content: Optional[torch.Tensor] = None
        self._with_position: Optional[torch.Tensor] = None

    @property
    def positions(self) -> torch.Tensor:
        """Patch centres ``[P, 2]`` in [-1, 1] (built on first use: routers that do not read them never pay)."""
        if self._positions is None:
            self._positions = patch_centers(self.grid.grid_h, self.grid.grid_w, self.x.device, self.x.dtype)
        return self._positions

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def pos_channels(self) -> int:
        return self.pos_map.shape[1]

    def content(self) -> torch.Tensor:
        """Patches of the map ``[B, P, C, n, n]`` (cut once)."""
        if self._content is None:
            self._content = self.extractor.extract(self.padded, self.grid)[0]
        return self._content

    def patches_with_position(self) -> torch.Tensor:
        """Patches with positional channels ``[B, P, C + Pc, n, n]`` (built once)."""
        if not self.pos_channels:
            return self.content()
        if self._with_position is None:
            g, n, Pc = self.grid, self.grid.patch_size, self.pos_channels
            pos = self.pos_map.reshape(1, Pc, g.grid_h, n, g.grid_w, n).permute(0, 2, 4, 1, 3, 5)
            pos = pos.reshape(1, g.num_patches, Pc, n, n).expand(self.batch, -1, -1, -1, -1)
            self._with_position = torch.cat([self.content(), pos], dim=2)
        return self._with_position

    def patches(self, with_position: bool) -> torch.Tensor:
        return self.patches_with_position() if with_position else self.content()

    def map(self, with_position: bool) -> torch.Tensor:
        """The padded map ``[B, C (+ Pc), Hp, Wp]`` (positional channels need non-overlapping patches)."""
        if not with_position or not self.pos_channels:
            return self.padded
        if self.grid.overlapping:
            raise ValueError("positional channels on the whole map need non-overlapping patches")
        return torch.cat([self.padded, self.pos_map.expand(self.batch, -1, -1, -1)], dim=1)

    def reassemble(self, tokens: torch.Tensor) -> torch.Tensor:
        """Expert outputs per patch ``[B * P, C, n, n]`` (or ``[B, P, C, n, n]``) -> ``[B, C, H, W]``."""
        g, n = self.grid, self.grid.patch_size
        return self.extractor.reassemble(tokens.reshape(self.batch, g.num_patches, -1, n, n), g)

    def windows(self, rows: torch.Tensor, halo: int) -> torch.Tensor:
        """Rows ``[B * P, c, n, n]`` re-tiled into a map and cut again with ``halo`` pixels of the neighbours'
        context: ``[B * P, c, n + 2 halo, n + 2 halo]``."""
        g, n = self.grid, self.grid.patch_size
        m = self.extractor.reassemble(rows.reshape(self.batch, g.num_patches, -1, n, n), g)
        out = self.extractor.extract_windows(m, g, halo)
        return out.reshape(self.batch * g.num_patches, -1, n + 2 * halo, n + 2 * halo)


def _bin_matrix(regions: Sequence[Tuple[int, int]], size: int, limit: int, like: torch.Tensor) -> torch.Tensor:
    """``[len(regions) * size, limit]`` averaging matrix: row ``i * size + j`` averages bin ``j`` of region ``i``
    ``[a, b)`` (clipped to ``[0, limit)``, widened to one pixel if empty): ``[a + floor(j L / size),
    a + ceil((j + 1) L / size))``, the bins of ``F.adaptive_avg_pool2d``."""
    starts, ends = [], []
    for a, b in regions:
        a = min(max(a, 0), limit - 1)
        L = max(min(max(b, 0), limit), a + 1) - a
        starts += [a + (j * L) // size for j in range(size)]
        ends += [a - (-(j + 1) * L // size) for j in range(size)]
    s = torch.tensor(starts, device=like.device)[:, None]
    e = torch.tensor(ends, device=like.device)[:, None]
    i = torch.arange(limit, device=like.device)
    return ((i >= s) & (i < e)).to(like.dtype) / (e - s).to(like.dtype)


def region_pool(x: torch.Tensor, rows: Sequence[Tuple[int, int]], cols: Sequence[Tuple[int, int]],
                size: int) -> torch.Tensor:
    """Adaptive average pooling of rectangular regions: ``x [B, C, H, W]``, row ranges ``[(a_i, b_i)] * gh`` and
    column ranges ``[(a_j, b_j)] * gw`` -> ``[B, C, gh * size, gw * size]``, region ``(i, j)`` pooled to
    ``size x size`` bins in block ``(i, j)`` (``F.adaptive_avg_pool2d``'s bins; regions may overlap or be smaller
    than ``size``, whose pixels are then repeated). Two matrix products (measured several times faster on CPU
    than pooling slices or gathering from an integral image)."""
    B, C, H, W = x.shape
    a_h, a_w = _bin_matrix(rows, size, H, x), _bin_matrix(cols, size, W, x)
    y = (x.reshape(B * C * H, W) @ a_w.t()).reshape(B * C, H, -1)  # [B C, H, gw size]
    return (a_h @ y).reshape(B, C, a_h.shape[0], a_w.shape[0])


def region_view(x: torch.Tensor, rows: Sequence[Tuple[int, int]], cols: Sequence[Tuple[int, int]], size: int,
                pos: PositionalEncoding) -> PatchedMap:
    """What a router reads about ``gh x gw`` regions of ``x [B, C, H, W]`` (:func:`region_pool`): a
    :class:`PatchedMap` of ``size x size`` patches over the pooled map ``[B, C, gh * size, gw * size]``, so
    ``router.route(view)`` works for every router; patch centres and positional channels follow the grid."""
    return PatchedMap(region_pool(x, rows, cols, size), PatchExtractor(size), pos)
