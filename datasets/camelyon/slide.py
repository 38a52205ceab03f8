"""Whole-slide reading through openslide-python + openslide-bin: opening with clear errors, level choice by
downsample or microns per pixel, RGB tiles (a tile that does not decode is an ``OSError`` naming the slide and the
tile), and the tissue mask (Otsu on HSV saturation, as CLAM and MONAI do; on darkness for a grayscale scan)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import cv2
import numpy as np
import openslide

__all__ = ["open_slide", "slide_mpp", "choose_level", "read_level", "tile_geometry", "TileGeometry", "read_rgb",
           "read_tile_rgb", "resize_rgb", "read_thumbnail", "tissue_mask", "is_grayscale", "slide_name", "SlideLike",
           "MPP_TOLERANCE"]

# A level whose resolution is within 1% of the target is read as it is (no resampling): the 0.499 um/px Aperio
# slide at mpp=0.5 reads 256 px tiles of level 0; level 1 of a Camelyon16 slide (0.486 um/px) is resampled.
MPP_TOLERANCE = 0.01

SlideLike = Union[str, os.PathLike, "openslide.OpenSlide"]


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    """Open a pyramidal slide; ``FileNotFoundError`` / ``ValueError`` naming the file and the reason."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: slide not found (expected a whole-slide image file: .tif, .svs, ...)")
    try:
        return openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        raise ValueError(f"{p}: unsupported slide format (expected a tiled pyramidal TIFF, SVS, NDPI, MRXS or "
                         f"another format OpenSlide reads; a stripped TIFF or plain image is not a slide)") from None
    except openslide.OpenSlideError as e:
        raise ValueError(f"{p}: unreadable slide ({e})") from None


def _as_slide(slide: SlideLike) -> Tuple[openslide.OpenSlide, bool]:
    if isinstance(slide, (str, os.PathLike)):
        return open_slide(slide), True
    return slide, False


def slide_name(slide: openslide.OpenSlide) -> str:
    """The file of an open slide (for messages)."""
    return str(getattr(slide, "_filename", None) or "slide")


def slide_mpp(slide: openslide.OpenSlide) -> Optional[float]:
    """Level-0 microns per pixel (mean of x and y), ``None`` when the file does not say."""
    try:
        mx = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        my = float(slide.properties[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    return (mx + my) / 2 if mx > 0 and my > 0 else None


def choose_level(slide: openslide.OpenSlide, downsample: Optional[float] = None,
                 mpp: Optional[float] = None, source: str = "slide") -> int:
    """The level whose downsample (or microns per pixel) is closest to the target, in log scale.
    Exactly one of ``downsample`` / ``mpp``; an ``mpp`` target on a slide without mpp is a ``ValueError``."""
    if (downsample is None) == (mpp is None):
        raise ValueError(f"{source}: choose_level needs exactly one of downsample= or mpp=")
    if mpp is not None:
        base = slide_mpp(slide)
        if base is None:
            raise ValueError(f"{source}: mpp={mpp} asked but the slide has no microns-per-pixel metadata "
                             f"(choose the level by downsample or index instead)")
        downsample = float(mpp) / base
    if downsample <= 0:
        raise ValueError(f"{source}: target downsample {downsample} must be positive")
    ds = np.asarray(slide.level_downsamples, dtype=np.float64)
    return int(np.argmin(np.abs(np.log(ds) - np.log(downsample))))


def read_level(slide: openslide.OpenSlide, downsample: float, tolerance: float = MPP_TOLERANCE) -> Tuple[int, float]:
    """``(level, scale)`` to read a target ``downsample`` (level-0 pixels per output pixel): the level whose
    downsample is the largest one not above the target (the closest finer-or-equal level; level 0 when the target
    is finer than level 0) and ``scale`` = target / that level's downsample (level pixels per output pixel), 1.0
    when within ``tolerance`` of it (the level is read as it is)."""
    if not (downsample > 0 and np.isfinite(downsample)):
        raise ValueError(f"{slide_name(slide)}: target downsample {downsample} must be a positive number")
    ds = np.asarray(slide.level_downsamples, dtype=np.float64)
    finer = np.flatnonzero(ds <= downsample * (1.0 + tolerance))
    level = int(finer[np.argmax(ds[finer])]) if len(finer) else int(np.argmin(ds))
    scale = float(downsample / ds[level])
    return level, (1.0 if abs(scale - 1.0) <= tolerance else scale)


class TileGeometry(NamedTuple):
    """How one slide is tiled: ``level`` read, its ``downsample``, ``scale`` (level pixels per output pixel, 1.0:
    no resampling) and ``base_mpp`` (level-0 microns per pixel, None when unknown)."""

    level: int
    downsample: float
    scale: float
    base_mpp: Optional[float]

    @property
    def mpp(self) -> Optional[float]:
        """Microns per pixel of the output tiles (None when the slide's is unknown)."""
        return None if self.base_mpp is None else self.base_mpp * self.downsample * self.scale

    @property
    def tile_downsample(self) -> float:
        """Level-0 pixels per output pixel (before rounding the read size)."""
        return self.downsample * self.scale

    def read_size(self, tile_size: int) -> int:
        """Level pixels read for a ``tile_size`` output tile."""
        return int(tile_size) if self.scale == 1.0 else max(int(round(tile_size * self.scale)), 1)


def tile_geometry(slide: openslide.OpenSlide, level: Optional[int] = None, mpp: Optional[float] = None,
                  downsample: Optional[float] = None, level0_mpp: Optional[float] = None,
                  source: str = "slide") -> TileGeometry:
    """The :class:`TileGeometry` of one of ``level`` (an index, read as it is), ``mpp`` (target microns per pixel
    of the tiles: :func:`read_level` of ``mpp / level-0 mpp``, resampled) or ``downsample`` (target level-0
    pixels per tile pixel, the same way); none of them: level 0. ``level0_mpp`` stands in for a slide that records
    no microns per pixel."""
    if sum(v is not None for v in (level, mpp, downsample)) > 1:
        raise ValueError(f"{source}: give one of level={level}, mpp={mpp}, downsample={downsample} (the tile "
                         f"resolution), not several")
    base = slide_mpp(slide)
    if base is None and level0_mpp is not None:
        base = float(level0_mpp)
    if mpp is not None:
        if base is None:
            raise ValueError(f"{source}: mpp={mpp} asked but the slide records no microns per pixel (give its "
                             f"level-0 mpp: level0_mpp= / infer_slide --mpp, or choose the level by index)")
        downsample = float(mpp) / base
    if downsample is not None:
        lvl, scale = read_level(slide, float(downsample))
    else:
        lvl, scale = int(level or 0), 1.0
        if not 0 <= lvl < slide.level_count:
            raise ValueError(f"{source}: level {lvl} out of range (the slide has levels 0..{slide.level_count - 1}; "
                             f"choose the resolution by mpp= instead of a level index)")
    return TileGeometry(lvl, float(slide.level_downsamples[lvl]), float(scale), base)


def read_tile_rgb(slide: openslide.OpenSlide, location: Tuple[int, int], level: int, read: int,
                  size: int) -> np.ndarray:
    """``uint8 [size, size, 3]``: the ``read`` x ``read`` level pixels at level-0 ``location`` resized to ``size``
    (area averaging when shrinking, bicubic when enlarging; no resize when ``read == size``)."""
    rgb = read_rgb(slide, location, level, (read, read))
    return rgb if read == size else resize_rgb(rgb, (size, size))


def resize_rgb(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``rgb`` resized to ``size=(w, h)`` (area averaging when shrinking, bicubic when enlarging)."""
    shrink = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (int(size[0]), int(size[1])), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def read_rgb(slide: openslide.OpenSlide, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB of ``read_region``; transparent pixels (outside the scanned area) become white.
    A region that does not decode (``openslide.OpenSlideError``: a corrupt tile) is an ``OSError`` naming the slide
    file and the region."""
    try:
        rgba = np.asarray(slide.read_region((int(location[0]), int(location[1])), int(level),
                                            (int(size[0]), int(size[1]))))
    except openslide.OpenSlideError as e:
        raise OSError(f"{slide_name(slide)}: the tile at level-0 ({int(location[0])}, {int(location[1])}), level "
                      f"{int(level)}, {int(size[0])} x {int(size[1])} px does not decode ({e}) (a slide whose tiles "
                      f"all decode: copy or convert it again)") from None
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)


def read_thumbnail(slide: openslide.OpenSlide, size: Tuple[int, int]) -> np.ndarray:
    """``uint8 [h, w, 3]`` RGB thumbnail fitting ``size``; ``OSError`` naming the slide when it does not decode."""
    try:
        return np.asarray(slide.get_thumbnail((int(size[0]), int(size[1]))).convert("RGB"))
    except openslide.OpenSlideError as e:
        raise OSError(f"{slide_name(slide)}: the thumbnail ({int(size[0])} x {int(size[1])} px) does not decode "
                      f"({e}) (a slide whose tiles all decode: copy or convert it again)") from None


def is_grayscale(rgb: np.ndarray, tolerance: int = 2) -> bool:
    """Whether an RGB image has no colour: its channels differ by at most ``tolerance`` everywhere but 0.1% of
    the pixels (a grayscale scan, which OpenSlide returns as R = G = B)."""
    rgb = np.asarray(rgb)
    spread = rgb.max(-1).astype(np.int16) - rgb.min(-1)
    return bool((spread > tolerance).mean() <= 1e-3)


def _low_res_rgb(slide: openslide.OpenSlide, level: Optional[int], target: float) -> Tuple[np.ndarray, float]:
    if level is None:
        ds = np.asarray(slide.level_downsamples)
        near = int(np.argmin(np.abs(np.log(ds) - np.log(target))))
        if abs(np.log(ds[near] / target)) <= np.log(2.0):
            level = near
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ValueError(f"tissue_mask: level {level} out of range 0..{slide.level_count - 1}")
        w, h = slide.level_dimensions[level]
        rgb = read_rgb(slide, (0, 0), level, (w, h))
    else:  # no level near the target: OpenSlide's thumbnail (downscaled from the best level)
        w0, h0 = slide.dimensions
        size = (max(int(round(w0 / target)), 1), max(int(round(h0 / target)), 1))
        rgb = read_thumbnail(slide, size)
    return rgb, slide.dimensions[0] / rgb.shape[1]


def tissue_mask(slide: SlideLike, level: Optional[int] = None, target_downsample: float = 32.0,
                blur: int = 7, close: int = 5, min_object: float = 0.0005,
                min_threshold: int = 15) -> Tuple[np.ndarray, float]:
    """Tissue on a low-resolution level (the one nearest ``target_downsample``) or the thumbnail.

    Median blur (``blur`` px, at most 1/8 of the mask's shorter side) of the HSV saturation (of a grayscale scan,
    :func:`is_grayscale`: the darkness below the glass, at least 220, with a warning), Otsu threshold (at
    least ``min_threshold``, so a blank slide is not split in two), morphological closing (``close`` px ellipse),
    then connected components smaller than ``min_object`` of the image area and holes smaller than it removed.
    Returns ``(mask bool [h, w], downsample)``: level-0 pixels per mask pixel (level-0 width / mask width).
    """
    sl, owned = _as_slide(slide)
    try:
        rgb, ds = _low_res_rgb(sl, level, target_downsample)
    finally:
        if owned:
            sl.close()
    rgb = np.ascontiguousarray(rgb)
    if is_grayscale(rgb):  # no stain colour to find: tissue is what is darker than the glass
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        glass = max(float(np.percentile(grey, 99)), 220.0)  # a scan that is all tissue still has white glass
        sat = np.clip(glass - grey.astype(np.float32), 0, 255).astype(np.uint8)
        warnings.warn(f"{slide if owned else slide_name(sl)}: no colour (a grayscale scan, or blank glass): tissue "
                      f"found by darkness instead of stain saturation", stacklevel=2)
    else:
        sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    blur = min(int(blur), max(min(sat.shape) // 8, 1)) | 1  # at most 1/8 of a tiny thumbnail's side
    if blur > 1:
        sat = cv2.medianBlur(sat, blur)
    thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (sat > max(thr, min_threshold)).astype(np.uint8)
    if close > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close, close)))
    min_px = max(int(min_object * mask.size), 1)
    mask = _drop_small(mask, min_px)                       # small specks
    mask = 1 - _drop_small(1 - mask, min_px)               # small holes
    return mask.astype(bool), float(ds)


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` (uint8 0/1 [h, w]) without its 8-connected components of fewer than ``min_px`` pixels."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[lab].astype(np.uint8) if n > 1 else mask
