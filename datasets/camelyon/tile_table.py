"""The tiles of a :class:`~.tiles.CamelyonTiles` as numpy columns (:class:`TileTable`) and the seeded selection of
a fixed subset of them spread over the slides (:func:`spread_subset`)."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Sequence

import numpy as np

from .slide import TileGeometry

__all__ = ["TileTable", "spread_subset", "COLUMNS"]

COLUMNS = ("slide_index", "x", "y", "col", "row", "tissue", "tumour", "label")


class TileTable(Sequence):
    """The tiles of a :class:`CamelyonTiles` as numpy columns (``slide_index``, ``x``, ``y``, ``col``, ``row``,
    ``tissue``, ``tumour``, ``label``): a few bytes per tile, shared copy-on-write with DataLoader workers, where a
    list of dicts would take ~1 KB per tile and be copied into every worker. ``table[i]`` is the dict of one tile:
    ``{"slide", "slide_index", "x", "y" (level-0 top-left), "col", "row" (grid position), "level", "size",
    "mpp" (of the tile; None when unknown), "tissue", "tumour", "label"}``."""

    def __init__(self, slides: Sequence[str], geometries: Sequence[TileGeometry], size: int,
                 columns: Mapping[str, np.ndarray]) -> None:
        self.slides, self.geometries, self.size = list(slides), list(geometries), int(size)
        self.columns = {k: np.asarray(columns[k]) for k in COLUMNS}

    def __len__(self) -> int:
        return len(self.columns["x"])

    def __getitem__(self, i: int) -> Dict[str, Any]:  # type: ignore[override]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(i)
        c = self.columns
        k = int(c["slide_index"][i])
        g = self.geometries[k]
        return {"slide": self.slides[k], "slide_index": k, "x": int(c["x"][i]), "y": int(c["y"][i]),
                "col": int(c["col"][i]), "row": int(c["row"][i]), "level": g.level, "size": self.size,
                "mpp": g.mpp, "tissue": float(c["tissue"][i]), "tumour": float(c["tumour"][i]),
                "label": int(c["label"][i])}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TileTable):
            return (self.slides == other.slides and self.size == other.size and self.geometries == other.geometries
                    and all(np.array_equal(self.columns[k], other.columns[k]) for k in COLUMNS))
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def select(self, index: np.ndarray) -> "TileTable":
        """The tiles at ``index`` (in that order)."""
        return TileTable(self.slides, self.geometries, self.size, {k: v[index] for k, v in self.columns.items()})


def spread_subset(slide_index: np.ndarray, positive: np.ndarray, max_tiles: int, tumour_fraction: Optional[float],
                  seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_tiles`` tiles, a fixed function of ``seed``: a fraction ``tumour_fraction``
    of them ``positive`` (tumour) tiles when there are enough (None: the tiles' own ratio), the rest normal ones,
    each kind spread evenly over the slides (round robin: one tile of every slide that has one left per round, in
    a seeded order), tiles drawn at random within a slide."""
    slide_index, positive = np.asarray(slide_index), np.asarray(positive, bool)
    total, n = len(slide_index), int(max_tiles)
    if n >= total:
        return np.arange(total)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    want = n * len(pos) / max(total, 1) if tumour_fraction is None else n * float(tumour_fraction)
    n_pos = min(int(np.floor(want + 0.5)), len(pos))
    n_neg = min(n - n_pos, len(neg))
    n_pos = min(len(pos), n - n_neg)  # too few normal tiles: more tumour ones
    rng = np.random.default_rng([int(seed), 0x5EED])
    return np.sort(np.concatenate([_round_robin(pos, slide_index, n_pos, rng),
                                   _round_robin(neg, slide_index, n_neg, rng)]))


def _round_robin(idx: np.ndarray, slide_index: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or not len(idx):
        return np.zeros(0, np.int64)
    perm = idx[rng.permutation(len(idx))]
    s = slide_index[perm]
    order = np.argsort(s, kind="stable")
    sizes = np.bincount(s, minlength=int(slide_index.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(perm), np.int64)
    rank[order] = np.arange(len(perm)) - starts[s[order]]    # position of each tile within its slide's draw
    slide_order = rng.permutation(len(sizes))[s]            # which slide comes first in every round
    return perm[np.lexsort((slide_order, rank))[:n]]

