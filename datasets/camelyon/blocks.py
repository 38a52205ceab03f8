"""Whole-slide inference reads: the tissue tiles of a :class:`CamelyonTiles` grouped into blocks of neighbouring
grid positions, each block read with one ``read_region`` call when its tiles cover most of it, so that
overlapping tiles (``stride < tile_size``) are not read (and decoded) again and again."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .slide import read_rgb, resize_rgb
from .tiles import CamelyonTiles

__all__ = ["TileBlocks"]


class TileBlocks(Dataset):
    """Item ``b`` -> ``(images float32 [n, 3, s, s], tile indices int64 [n])``: the tiles of block ``b`` (grid
    positions ``block`` x ``block`` steps of one slide, tissue tiles only, row-major), through the dataset's
    ``transform`` as ``tiles[i]`` would be (a segmentation transform gets an empty mask).

    A block whose tiles cover at least ``min_cover`` of their bounding box is read as one region (the box at the
    tiles' level, resized as a whole when the slide is resampled) and the tiles are cut from it; other blocks are
    read tile by tile. Without resampling the tiles equal ``tiles.read_tile`` exactly; with it they differ only by
    the interpolation at tile borders. ``block=0``: every tile is read on its own (one tile per item)."""

    def __init__(self, tiles: CamelyonTiles, block: int = 8, min_cover: float = 0.5) -> None:
        self.tiles, self.block, self.min_cover = tiles, int(block), float(min_cover)
        c = tiles.tiles.columns
        n = len(c["x"])
        if self.block <= 0:
            self.groups: List[np.ndarray] = [np.array([i]) for i in range(n)]
            return
        bc, br = c["col"] // self.block, c["row"] // self.block
        order = np.lexsort((c["col"], c["row"], bc, br, c["slide_index"]))
        key = np.stack([c["slide_index"][order], br[order], bc[order]], 1)
        cuts = np.flatnonzero(np.any(np.diff(key, axis=0) != 0, axis=1)) + 1 if n > 1 else np.zeros(0, int)
        self.groups = [g for g in np.split(order, cuts) if len(g)]

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_tiles(self) -> int:
        return int(sum(len(g) for g in self.groups))

    def _region(self, idx: np.ndarray) -> List[np.ndarray]:
        """The tiles ``idx`` of one slide cut from one read of their bounding box, or ``[]`` when they cover less
        than ``min_cover`` of it."""
        ds = self.tiles
        c = ds.tiles.columns
        k = int(c["slide_index"][idx[0]])
        g, read, s, stride = ds.geometries[k], ds.read_sizes[k], ds.tile_size, ds.stride
        cols, rows = c["col"][idx], c["row"][idx]
        c0, r0 = int(cols.min()), int(rows.min())
        out_w, out_h = (int(cols.max()) - c0) * stride + s, (int(rows.max()) - r0) * stride + s
        if len(idx) == 1:
            return []
        span = -(-s // stride)  # grid cells (stride x stride) a tile spans
        covered = np.zeros((int(rows.max()) - r0 + span, int(cols.max()) - c0 + span), bool)
        for cc, r in zip(cols - c0, rows - r0):
            covered[r:r + span, cc:cc + span] = True
        if min(covered.sum() * stride * stride, out_w * out_h) < self.min_cover * out_w * out_h:
            return []  # scattered tiles: reading the whole box would read more than the tiles
        step = stride * g.scale
        x0, y0 = int(round(c0 * step * g.downsample)), int(round(r0 * step * g.downsample))
        if g.scale == 1.0:
            rgb = read_rgb(ds._handle(k), (x0, y0), g.level, (out_w, out_h))
        else:
            w = int(round((int(cols.max()) - c0) * step)) + read
            h = int(round((int(rows.max()) - r0) * step)) + read
            rgb = resize_rgb(read_rgb(ds._handle(k), (x0, y0), g.level, (w, h)), (out_w, out_h))
        return [rgb[(r - r0) * stride:(r - r0) * stride + s, (cc - c0) * stride:(cc - c0) * stride + s]
                for cc, r in zip(cols.tolist(), rows.tolist())]

    def _prepare(self, rgb: np.ndarray) -> torch.Tensor:
        ds = self.tiles
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
        if ds.transform is None:
            return image
        if ds.mode == "segment":
            return ds.transform(image, torch.zeros(image.shape[1:], dtype=torch.int64))[0]
        return ds.transform(image)

    def __getitem__(self, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = self.groups[b]
        rgbs = self._region(idx) if self.block > 0 else []
        if not rgbs:
            rgbs = [self.tiles.read_tile(int(i)) for i in idx]
        return torch.stack([self._prepare(r) for r in rgbs]), torch.from_numpy(idx.astype(np.int64))
