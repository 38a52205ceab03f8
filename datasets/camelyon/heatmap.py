"""Slide heat-maps: tile probabilities accumulated into a low-resolution map, and its overlay on the thumbnail."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import cv2
import numpy as np

__all__ = ["HeatmapAccumulator", "heatmap_cell", "overlay_heatmap"]


def heatmap_cell(tile_size: int, stride: int, per_pixel: bool) -> int:
    """Side of one heat-map pixel in level pixels: divides both ``tile_size`` and ``stride``; for per-pixel
    (segmentation) outputs also at most ``tile_size / 16``, for per-tile outputs as large as possible."""
    cell = math.gcd(int(tile_size), int(stride))
    return math.gcd(cell, max(int(tile_size) // 16, 1)) if per_pixel else cell


class HeatmapAccumulator:
    """Mean of overlapping tile outputs on a grid of ``cell`` level pixels over a level of ``level_size=(w, h)``.

    ``add(x, y, probs)``: ``(x, y)`` the tile's top-left corner in level pixels (multiples of ``cell``), ``probs``
    a float array ``[s / cell, s / cell]`` (or a scalar for the whole tile, with ``tile_size``).
    """

    def __init__(self, level_size: Tuple[int, int], cell: int, tile_size: int) -> None:
        self.cell, self.cells_per_tile = int(cell), int(tile_size) // int(cell)
        w, h = (int(v) // self.cell for v in level_size)
        self.sum = np.zeros((h, w), np.float64)
        self.count = np.zeros((h, w), np.int32)

    def add(self, x: int, y: int, probs) -> None:
        c, n = self.cell, self.cells_per_tile
        r0, c0 = int(y) // c, int(x) // c
        block = np.broadcast_to(np.asarray(probs, np.float64), (n, n))
        self.sum[r0:r0 + n, c0:c0 + n] += block[: self.sum.shape[0] - r0, : self.sum.shape[1] - c0]
        self.count[r0:r0 + n, c0:c0 + n] += 1

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(probability float32 [h, w], 0 where no tile; covered bool [h, w])``."""
        covered = self.count > 0
        prob = np.where(covered, self.sum / np.maximum(self.count, 1), 0.0).astype(np.float32)
        return prob, covered


def overlay_heatmap(thumbnail: np.ndarray, prob: np.ndarray, covered: Optional[np.ndarray] = None,
                    alpha: float = 0.6) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB: the thumbnail (resized to the map) with the probability in the jet colour map
    blended over covered pixels (opacity ``alpha``, scaled by the probability so normal tissue stays visible)."""
    h, w = prob.shape
    thumb = cv2.resize(np.ascontiguousarray(thumbnail[..., :3]), (w, h), interpolation=cv2.INTER_AREA)
    colour = cv2.applyColorMap((np.clip(prob, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    a = alpha * (0.25 + 0.75 * np.clip(prob, 0, 1))[..., None]
    if covered is not None:
        a = a * covered[..., None]
    return (thumb * (1 - a) + colour * a + 0.5).astype(np.uint8)
