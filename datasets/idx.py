"""IDX file reader and the MNIST / Fashion-MNIST datasets built on it.

IDX format: 2 zero bytes, a dtype code, the number of dims ``n``, then ``n`` big-endian
uint32 sizes and the big-endian data. Files may be gzipped (detected by the gzip magic bytes).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import check_split
from .registry import DATASETS

__all__ = ["read_idx", "MNIST", "FashionMNIST"]

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-endian array of the header's shape.

    Raises FileNotFoundError if missing, ValueError (naming the file) for a bad magic number,
    unknown dtype code or a data size that does not match the header.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes, expected at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 followed by dtype code and ndim)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (expected one of {known})")
    dtype = IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {tuple(dims)} of {dtype.str} ({expected} data bytes), "
            f"but the file holds {actual} data bytes ({'truncated' if actual < expected else 'trailing data'})"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


@DATASETS.register("mnist")
class MNIST(Dataset):
    """MNIST from the original IDX files.

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` directly, or in the
    torchvision layout ``root/MNIST/raw/`` (also ``root/raw/``).
    Items: ``(image float32 [1, 28, 28] in [0, 1], then ``transforms``; label int)``.
    Attributes: ``classes`` (list[str]), ``targets`` (np.int64 [N]), ``data`` (np.uint8 [N, 28, 28]).
    """

    CLASSES: list[str] = [str(i) for i in range(10)]
    FOLDER = "MNIST"
    DEFAULT_ROOT: str | None = None
    FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transforms: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        name = type(self).__name__
        if root is None:
            if self.DEFAULT_ROOT is None:
                raise ValueError(f"{name}: root is required (directory holding the IDX files)")
            root = self.DEFAULT_ROOT
        self.root = Path(root)
        self.split = check_split(split, tuple(self.FILES), name)
        self.transforms = transforms
        self.classes = list(self.CLASSES)

        img_name, lbl_name = self.FILES[split]
        self.folder = self._find_folder(img_name)
        self.image_file = self._pick(self.folder, img_name)
        self.label_file = self._pick(self.folder, lbl_name)
        images = read_idx(self.image_file)
        labels = read_idx(self.label_file)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(
                f"{self.image_file}: expected uint8 images of shape [N, H, W], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{self.label_file}: expected integer labels of shape [N], got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise ValueError(
                f"{name}: {self.image_file} has {len(images)} images but {self.label_file} has {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"{self.label_file}: labels must be in [0, {len(self.classes)}), got {labels.min()}..{labels.max()}")
        self.data = images
        self.targets = labels.astype(np.int64)

    def _candidates(self) -> list[Path]:
        return [self.root, self.root / "raw", self.root / self.FOLDER / "raw"]

    @staticmethod
    def _pick(folder: Path, base: str) -> Path:
        for p in (folder / base, folder / f"{base}.gz"):
            if p.is_file():
                return p
        raise FileNotFoundError(f"missing IDX file: expected {folder / base} or {folder / base}.gz")

    def _find_folder(self, img_name: str) -> Path:
        for d in self._candidates():
            if (d / img_name).is_file() or (d / f"{img_name}.gz").is_file():
                return d
        tried = ", ".join(str(d / f"{img_name}[.gz]") for d in self._candidates())
        raise FileNotFoundError(f"{type(self).__name__} {self.split} images not found under {self.root}; tried {tried}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.data[index]).float().div_(255.0).unsqueeze(0)
        if self.transforms is not None:
            image = self.transforms(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


@DATASETS.register("fashion_mnist")
class FashionMNIST(MNIST):
    """Fashion-MNIST (same IDX files/format as MNIST, clothing class names).

    Default ``root`` is ``DEFAULT_ROOT`` = ``/usr/share/datasets/fashion-mnist`` (where the Debian
    package ``dataset-fashion-mnist`` installs the gz files); torchvision layout ``root/FashionMNIST/raw/``
    is accepted too. Items: ``(image float32 [1, 28, 28] in [0, 1], label int)``.
    """

    CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    FOLDER = "FashionMNIST"
    DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
