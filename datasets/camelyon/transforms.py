"""Tile augmentation for pathology: the 8 dihedral symmetries (flips and 90-degree rotations: tissue has no
up or left) and light brightness / saturation jitter, then normalisation."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..registry import TRANSFORMS

__all__ = ["TileTransform"]


@TRANSFORMS.register("camelyon_tile")
class TileTransform:
    """``(image float32 [3, s, s] in [0, 1], mask int64 [s, s] or None)`` -> the same, augmented (train) and
    normalised with ``mean`` / ``std``; called with the image alone it returns the image (classification).

    Train: a random dihedral symmetry (``dihedral``), brightness x U(1 - b, 1 + b) and saturation (distance from
    the grey value) x U(1 - c, 1 + c) with ``jitter=(b, c)``. In a DataLoader worker the stream is re-seeded from
    the worker seed + ``seed``.
    """

    def __init__(self, train: bool = False, dihedral: bool = True, jitter: Sequence[float] = (0.1, 0.1),
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: Optional[int] = None) -> None:
        self.train, self.dihedral = bool(train), bool(dihedral)
        self.jitter = (float(jitter[0]), float(jitter[1])) if jitter else (0.0, 0.0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.seed = 0 if seed is None else int(seed)
        self._rng, self._worker = np.random.default_rng(self.seed), None

    def _gen(self) -> np.random.Generator:
        info = get_worker_info()
        wid = None if info is None else info.id
        if wid != self._worker:
            self._rng, self._worker = np.random.default_rng([info.seed % 2 ** 32, self.seed]), wid
        return self._rng

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if self.train:
            g = self._gen()
            if self.dihedral:
                k, flip = int(g.integers(4)), bool(g.integers(2))
                image = torch.rot90(image, k, (1, 2))
                mask = torch.rot90(mask, k, (0, 1)) if mask is not None else None
                if flip:
                    image = image.flip(2)
                    mask = mask.flip(1) if mask is not None else None
            b, c = self.jitter
            if b or c:
                image = image * float(g.uniform(1 - b, 1 + b))
                grey = image.mean(0, keepdim=True)
                image = (grey + (image - grey) * float(g.uniform(1 - c, 1 + c))).clamp_(0, 1)
        image = ((image - self.mean) / self.std).contiguous()
        if mask is None:
            return image
        return image, mask.contiguous()
