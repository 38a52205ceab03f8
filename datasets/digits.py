"""scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download)."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import check_split
from .registry import DATASETS

__all__ = ["Digits"]


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    d = load_digits()
    images = d.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    targets = d.target.astype(np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


@DATASETS.register("digits")
class Digits(Dataset):
    """Deterministic stratified train/test split of ``sklearn.datasets.load_digits``.

    Items: ``(image float32 [1, size, size] in [0, 1] (raw 0..16 / 16, bilinearly resized from
    8x8 when ``size != 8``), then ``transforms``; label int)``.
    The test split holds ``ceil(1797 * test_fraction)`` images; same ``seed`` -> same split.
    Attributes: ``classes`` ("0".."9"), ``targets`` (np.int64 [N]), ``indices`` (rows of load_digits).
    """

    NUM_IMAGES = 1797

    def __init__(
        self,
        split: str = "train",
        transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
        test_fraction: float = 0.25,
        seed: int = 0,
        size: int = 16,
    ) -> None:
        from sklearn.model_selection import train_test_split

        self.split = check_split(split, ("train", "test"), "Digits")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"Digits: test_fraction must be in (0, 1), got {test_fraction!r}")
        if int(size) != size or size < 1:
            raise ValueError(f"Digits: size must be a positive int, got {size!r}")
        self.transforms = transforms
        self.size = int(size)
        self.classes = [str(i) for i in range(10)]
        images, targets = _load()
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=test_fraction, stratify=targets, random_state=seed
        )
        self.indices = np.sort(train_idx if split == "train" else test_idx)
        x = torch.from_numpy(images[self.indices].copy()).unsqueeze(1).div_(16.0)  # [N, 1, 8, 8]
        if self.size != 8:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        self.data = x.clamp_(0.0, 1.0).contiguous()  # float32 [N, 1, size, size]
        self.targets = targets[self.indices].copy()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index].clone()
        if self.transforms is not None:
            image = self.transforms(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n={len(self)}, size={self.size})"
