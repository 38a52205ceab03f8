"""Tiny ImageNet (200 classes, 64x64 JPEGs) from its extracted folder.

Layout::

    root/wnids.txt                      one wnid per line; line order = class index
    root/words.txt                      optional, "wnid<TAB>names"
    root/train/<wnid>/images/*.JPEG
    root/val/images/*.JPEG
    root/val/val_annotations.txt        "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import check_split, require_file
from .registry import DATASETS

__all__ = ["TinyImageNet"]

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


@DATASETS.register("tiny_imagenet")
class TinyImageNet(Dataset):
    """Tiny ImageNet ``train`` or ``val`` split (the unlabelled ``test`` split is not supported).

    Items: ``(image float32 [3, 64, 64] in [0, 1] (grayscale JPEGs converted to RGB), then
    ``transforms``; label int)``. Attributes: ``wnids`` (class ids, wnids.txt order),
    ``classes`` (names from words.txt, else the wnids), ``samples`` (list of (path, label)),
    ``targets`` (np.int64 [N]). Images are read lazily.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split, ("train", "val"), "TinyImageNet")
        self.transforms = transforms
        self.wnids = self._read_wnids(require_file(self.root / "wnids.txt", "TinyImageNet class list"))
        index = {w: i for i, w in enumerate(self.wnids)}
        self.classes = self._read_words(self.root / "words.txt")
        self.samples = self._train_samples(index) if split == "train" else self._val_samples(index)
        if not self.samples:
            raise ValueError(f"TinyImageNet: no {split} images found under {self.root / split}")
        self.targets = np.asarray([t for _, t in self.samples], dtype=np.int64)

    @staticmethod
    def _read_wnids(path: Path) -> list[str]:
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not wnids:
            raise ValueError(f"{path}: no class ids found")
        if len(set(wnids)) != len(wnids):
            raise ValueError(f"{path}: duplicate class ids")
        return wnids

    def _read_words(self, path: Path) -> list[str]:
        names: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                parts = line.split("\t", 1)
                if len(parts) == 2:
                    names[parts[0].strip()] = parts[1].strip()
        return [names.get(w, w) for w in self.wnids]

    def _train_samples(self, index: dict[str, int]) -> list[tuple[Path, int]]:
        samples: list[tuple[Path, int]] = []
        for wnid, label in index.items():
            folder = self.root / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"TinyImageNet: missing train folder for class {wnid}: expected {folder}")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            samples.extend((p, label) for p in files)
        return samples

    def _val_samples(self, index: dict[str, int]) -> list[tuple[Path, int]]:
        ann = require_file(self.root / "val" / "val_annotations.txt", "TinyImageNet val annotations")
        folder = self.root / "val" / "images"
        samples: list[tuple[Path, int]] = []
        for n, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line!r}")
            fname, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in index:
                raise ValueError(f"{ann}:{n}: class {wnid!r} is not listed in {self.root / 'wnids.txt'}")
            path = folder / fname
            if not path.is_file():
                raise FileNotFoundError(f"{ann}:{n}: image not found: expected {path}")
            samples.append((path, index[wnid]))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from e
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.transforms is not None:
            image = self.transforms(image)
        return image, label

    def __repr__(self) -> str:
        return f"TinyImageNet(split={self.split!r}, n={len(self)}, classes={len(self.wnids)}, root={str(self.root)!r})"
