"""Reading pixels for the VOC datasets: images as arrays / tensors and class-index masks.

:func:`image_to_array` (any PIL image as float ``[H, W, C]`` in [0, 1], 16-bit scaled, never clipped: values
outside the documented range, NaN and infinite pixels are a :class:`PixelValueError` naming the file) is also
what the tools read a user's images with (``pce.tasks.tooling.load_image``); :func:`load_index_mask` reads
``SegmentationClass`` PNGs. The format itself (classes, palette, folders, XML) is in
:mod:`pce.datasets.voc_format`, the datasets in :mod:`pce.datasets.voc`. Every error about bad input names the
offending file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .voc_format import IGNORE_INDEX

__all__ = ["image_to_array", "load_index_mask", "PixelValueError"]

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_FLOAT_TOLERANCE = 1e-6  # float pixels this far outside [0, 1] are rounding, clipped; farther is an error


class PixelValueError(ValueError):
    """Pixel values an image format does not allow (NaN, infinite, outside the documented range):
    ``<file>: <what> (<expected>)``."""

    def __init__(self, where: str, what: str, expected: str) -> None:
        self.where, self.what, self.expected = str(where), what, expected
        super().__init__(f"{where}: {what} ({expected})")


def _value_range(arr: np.ndarray) -> str:
    return f"[{float(arr.min()):g}, {float(arr.max()):g}]"


def image_to_array(im: Image.Image, channels: int = 3, where: str | os.PathLike | None = None) -> np.ndarray:
    """A PIL image as float32 ``[H, W, channels]`` in [0, 1] (``channels`` 1 or 3).

    The documented ranges, never clipped silently: 16-bit images (``I;16*``) are scaled by 65535 (not clipped to
    255 as ``Image.convert`` does); 32-bit integer images (``I``) by 65535, or by 255 when no value exceeds 255,
    and values outside 0..65535 are refused; 32-bit float images (``F``) must hold values in [0, 1]. NaN or
    infinite pixels, and values outside the range, raise :class:`PixelValueError` naming ``where`` (default: the
    image's file name) and the values found."""
    if im.mode in _HIGH_BIT_MODES:
        where = where if where is not None else (getattr(im, "filename", None) or "image")
        arr = np.asarray(im, dtype=np.float32)
        if im.mode == "F" and arr.size:
            bad = ~np.isfinite(arr)
            if bad.any():
                raise PixelValueError(where, f"{int(bad.sum())} NaN / infinite pixel value(s) of {arr.size} in a "
                                      "32-bit float image", "finite pixel values in [0, 1]")
            if arr.min() < -_FLOAT_TOLERANCE or arr.max() > 1 + _FLOAT_TOLERANCE:
                raise PixelValueError(where, f"32-bit float pixel values span {_value_range(arr)}, outside [0, 1]",
                                      "a float image scaled to [0, 1], or an 8-bit / 16-bit integer image")
        elif im.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise PixelValueError(where, f"32-bit integer pixel values span {_value_range(arr)}, outside 0..65535",
                                  "an 8-bit or 16-bit image, or a float image in [0, 1]")
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 65535.0
        elif im.mode == "I":
            arr = arr / 255.0
        arr = np.clip(arr, 0.0, 1.0)[..., None]  # only rounding of float images is left to clip
        return np.repeat(arr, 3, axis=2) if channels == 3 else arr
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _load_rgb(path: Path) -> np.ndarray:
    """Load an image file as uint8 RGB [H, W, 3] (16-bit images scaled to 8 bits); errors name the file (pixel
    values outside the format's range, NaN: :class:`PixelValueError`)."""
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in _HIGH_BIT_MODES:
                return np.round(image_to_array(im, 3, where=path) * 255.0).astype(np.uint8)
            return np.array(im.convert("RGB"))
    except Image.DecompressionBombError as e:  # not an OSError: it would name no file
        raise ValueError(f"{path}: too many pixels: {e} (a smaller image; PIL.Image.MAX_IMAGE_PIXELS guards "
                         "against decompression bombs)") from e
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
