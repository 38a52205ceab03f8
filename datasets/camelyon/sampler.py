"""``BalancedTileSampler``: per-epoch draws of tile indices with a fixed fraction of tumour tiles (DDP-aware)."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
from torch.utils.data import Sampler

from .tiles import CamelyonTiles

__all__ = ["BalancedTileSampler"]


class BalancedTileSampler(Sampler[int]):
    """Draws ``num_samples`` tile indices per epoch (default ``len(dataset)``), a fraction ``tumour_fraction``
    of them from the tumour tiles (``tumour > 0``, or ``label`` in classify mode), with replacement. With
    ``num_replicas`` > 1 each rank gets its own ``num_samples // num_replicas`` draws; call :meth:`set_epoch`."""

    def __init__(self, dataset: CamelyonTiles, tumour_fraction: float = 0.5, num_samples: Optional[int] = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        pos = dataset.positive_tiles()
        self.pos, self.neg = np.flatnonzero(pos), np.flatnonzero(~pos)
        if not len(self.pos) or not len(self.neg):
            raise ValueError(f"BalancedTileSampler: {len(self.pos)} tumour and {len(self.neg)} normal tiles "
                             f"(both kinds are needed)")
        self.fraction = float(tumour_fraction)
        self.num_samples = int(num_samples or len(dataset.tiles)) // int(num_replicas)
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = np.random.default_rng([self.seed, self.epoch, self.rank])
        is_pos = g.random(self.num_samples) < self.fraction
        out = np.where(is_pos, self.pos[g.integers(len(self.pos), size=self.num_samples)],
                       self.neg[g.integers(len(self.neg), size=self.num_samples)])
        return iter(out.tolist())
