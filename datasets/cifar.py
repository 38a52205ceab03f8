"""CIFAR-10 / CIFAR-100 from the official "python version" pickle batches.

The batches are Python pickles: they are read with a restricted unpickler that only builds the builtins and
numpy types the official batches contain (dicts, lists, bytes, str, numbers, numpy arrays), so a damaged or
hostile file cannot run code; anything else is an error naming the file and the refused global.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import check_split, require_file
from .registry import DATASETS

__all__ = ["CIFAR10", "CIFAR100"]


# (module, name) pairs a CIFAR batch may reference: numpy's array reconstruction (numpy 1 and 2 paths)
_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
                              "float", "complex", "bool")
} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {
    (m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (a CIFAR batch holds only builtins and numpy "
                                     f"arrays)")


def _load_pickle(path: Path) -> dict:
    require_file(path, "CIFAR batch")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... on damaged files
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _key(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: missing key b{key!r} (found {sorted(map(repr, d))})")


def _names(d: dict, key: str, path: Path) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _key(d, key, path)]


class _CIFAR(Dataset):
    FOLDER: str
    SPLITS: dict[str, list[str]]
    META: str
    LABEL_KEY: str
    NAMES_KEY: str
    NAME: str

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split, tuple(self.SPLITS), self.NAME)
        self.transforms = transforms
        self.folder = self._resolve(self.root)
        meta_path = self.folder / self.META
        self.classes = _names(_load_pickle(meta_path), self.NAMES_KEY, meta_path)
        datas, labels = [], []
        for fname in self.SPLITS[split]:
            path = self.folder / fname
            d = _load_pickle(path)
            data = np.asarray(_key(d, "data", path))
            lab = np.asarray(_key(d, self.LABEL_KEY, path))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: expected b'data' uint8 of shape [N, 3072], got {data.dtype} {data.shape}")
            if lab.ndim != 1 or len(lab) != len(data) or (len(lab) and lab.dtype.kind not in "iu"):
                raise ValueError(f"{path}: expected {len(data)} integer labels in b{self.LABEL_KEY!r}, got shape {lab.shape}")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise ValueError(f"{path}: labels must be in [0, {len(self.classes)}), got {lab.min()}..{lab.max()}")
            datas.append(data.reshape(-1, 3, 32, 32))
            labels.append(lab.astype(np.int64))
        self.data = np.concatenate(datas)  # uint8 [N, 3, 32, 32]
        self.targets = np.concatenate(labels)  # int64 [N]

    def _resolve(self, root: Path) -> Path:
        if (root / self.FOLDER).is_dir():
            return root / self.FOLDER
        if (root / self.META).is_file() or any((root / f).is_file() for fs in self.SPLITS.values() for f in fs):
            return root
        raise FileNotFoundError(
            f"{self.NAME} not found: expected folder {root / self.FOLDER} or {root} itself holding "
            f"{self.META} and {', '.join(f for fs in self.SPLITS.values() for f in fs)}"
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.data[index]).float().div_(255.0)
        if self.transforms is not None:
            image = self.transforms(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


@DATASETS.register("cifar10")
class CIFAR10(_CIFAR):
    """CIFAR-10; ``root`` is the folder holding ``cifar-10-batches-py`` or that folder itself.

    Items: ``(image float32 [3, 32, 32] in [0, 1], then ``transforms``; label int)``.
    Attributes: ``classes`` (from ``batches.meta``), ``targets`` (np.int64 [N]), ``data`` (uint8 [N, 3, 32, 32]).
    """

    NAME = "CIFAR10"
    FOLDER = "cifar-10-batches-py"
    SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    META = "batches.meta"
    LABEL_KEY = "labels"
    NAMES_KEY = "label_names"


@DATASETS.register("cifar100")
class CIFAR100(_CIFAR):
    """CIFAR-100; ``root`` is the folder holding ``cifar-100-python`` or that folder itself.

    ``label="fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    Items: ``(image float32 [3, 32, 32] in [0, 1], label int)``.
    """

    NAME = "CIFAR100"
    FOLDER = "cifar-100-python"
    SPLITS = {"train": ["train"], "test": ["test"]}
    META = "meta"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
        label: str = "fine",
    ) -> None:
        if label not in ("fine", "coarse"):
            raise ValueError(f"CIFAR100: label must be 'fine' or 'coarse', got {label!r}")
        self.label = label
        self.LABEL_KEY = f"{label}_labels"
        self.NAMES_KEY = f"{label}_label_names"
        super().__init__(root, split, transforms)
