"""Reading pixels for the VOC datasets: images as arrays / tensors and class-index masks.

:func:`image_to_array` (any PIL image as float ``[H, W, C]`` in [0, 1], 16-bit scaled, not clipped) is also
what ``tools/infer.py`` reads its inputs with; :func:`load_index_mask` reads ``SegmentationClass`` PNGs. The
format itself (classes, palette, folders, XML) is in :mod:`pce.datasets.voc_format`, the datasets in
:mod:`pce.datasets.voc`. Every error about bad input names the offending file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .voc_format import IGNORE_INDEX

__all__ = ["image_to_array", "load_index_mask"]

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def image_to_array(im: Image.Image, channels: int = 3) -> np.ndarray:
    """A PIL image as float32 ``[H, W, channels]`` in [0, 1] (``channels`` 1 or 3). 16-bit images are scaled by
    65535 (not clipped to 255 as ``Image.convert`` does); 32-bit float images are taken as [0, 1]."""
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 65535.0
        elif im.mode == "I":
            arr = arr / 255.0
        arr = np.clip(arr, 0.0, 1.0)[..., None]
        return np.repeat(arr, 3, axis=2) if channels == 3 else arr
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _load_rgb(path: Path) -> np.ndarray:
    """Load an image file as uint8 RGB [H, W, 3] (16-bit images scaled to 8 bits); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in _HIGH_BIT_MODES:
                return np.round(image_to_array(im, 3) * 255.0).astype(np.uint8)
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"Could not read image {path}: {e}") from e


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def load_index_mask(path: str | os.PathLike, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Read a palette ('P') or grayscale ('L') PNG of class indices as uint8 [H, W].

    Raises ValueError naming ``path`` for an RGB/RGBA (colour-encoded) mask or for values outside
    ``0..num_classes-1`` and ``ignore_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask file not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise ValueError(
                    f"Mask {path} has image mode {mode!r}; it must be a palette ('P') or 8-bit index ('L') PNG "
                    "whose pixel values are class indices (an RGB colour-encoded mask was probably given "
                    "by mistake; convert it to class indices with the VOC palette first)"
                )
            mask = np.array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"Could not read mask {path}: {e}") from e
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[ignore_index] = True
    bad = ~valid[mask]
    if bad.any():
        vals = np.unique(mask[bad])
        raise ValueError(
            f"Mask {path} contains values {vals[:10].tolist()} outside 0..{num_classes - 1} and {ignore_index}"
        )
    return mask
