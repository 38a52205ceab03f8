"""The tile index of one slide: the grid of tiles at a level, their tissue and tumour fractions and the label
of their central region, cached on disk (``.npz``) keyed by the slide file, its annotations and the grid."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from .annotations import Annotation, annotation_labels, rasterize
from .slide import open_slide, tissue_mask

__all__ = ["index_slide", "box_fractions", "centre_slice", "INDEX_VERSION"]

INDEX_VERSION = 3  # 3: grid positions (col, row) and resampled tiles (scale, read)
_SAMPLE = 64  # tumour fractions are sampled on at most 64 x 64 points per tile


def centre_slice(size: int) -> slice:
    """The middle third of ``size`` pixels, ``[size // 3, size - size // 3)`` (96 -> the central 32)."""
    return slice(size // 3, size - size // 3)


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Area-weighted mean of ``mask`` ``[h, w]`` over fractional boxes ``[N, 4]`` (x0, y0, x1, y1 in mask pixels):
    bilinear reads of the integral image, exact for a piecewise-constant mask."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0, x1 = np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 2], 0, w)
    y0, y1 = np.clip(boxes[:, 1], 0, h), np.clip(boxes[:, 3], 0, h)

    def at(y, x):
        return ndimage.map_coordinates(integral, [y, x], order=1, mode="nearest")

    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    return np.where(area > 0, s / np.maximum(area, 1e-12), 0.0)


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _annotation_digest(annotations: Optional[Sequence[Annotation]]) -> str:
    if not annotations:
        return "none"
    h = hashlib.sha1()
    for a in annotations:
        h.update(f"{a.name}|{a.group}|{a.kind}|".encode())
        h.update(np.ascontiguousarray(a.coords, dtype=np.float64).tobytes())
    return h.hexdigest()[:20]


def check_inside(annotations: Sequence[Annotation], dims: Sequence[int], source: str) -> None:
    """``ValueError`` naming ``source`` (the annotation's XML when known), the annotation and its first
    coordinate outside the level-0 ``dims`` (w, h) when one lies outside the slide."""
    w, h = dims
    for a in annotations:
        x0, y0, x1, y1 = a.bbox
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            c = np.asarray(a.coords)
            k = int(np.flatnonzero((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] > w) | (c[:, 1] > h))[0])
            raise ValueError(f"{a.source or source}: annotation {a.name!r} spans x {x0:.0f}..{x1:.0f}, y "
                             f"{y0:.0f}..{y1:.0f}: its coordinate ({c[k, 0]:g}, {c[k, 1]:g}) lies outside the "
                             f"slide (level 0 is {w} x {h} pixels; expected annotations of this slide, in its "
                             f"level-0 pixels)")


_CACHE_KEYS = ("x", "y", "col", "row", "tissue", "tumour", "centre", "downsample", "scale", "read")


def _read_cache(cache: Path) -> Optional[Dict[str, np.ndarray]]:
    """The cached index, or ``None`` with a warning when the file is broken (truncated by a crash, a full disk,
    another version): it is then rebuilt and replaced."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        missing = [k for k in _CACHE_KEYS if k not in out]
        if missing:
            raise KeyError(f"no {missing}")
        return out
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"{cache}: unreadable tile-index cache ({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
        return None


def _tumour(annotations: Sequence[Annotation], xs: np.ndarray, ys: np.ndarray, extent: float,
            label_map: Optional[Mapping[str, int]]):
    """Tumour fraction and central-third label of tiles at level-0 ``xs, ys`` of level-0 side ``extent``."""
    frac = np.zeros(len(xs), np.float32)
    centre = np.zeros(len(xs), bool)
    labels = annotation_labels(annotations, label_map)
    pos = [a.bbox for a, lab in zip(annotations, labels) if lab > 0 and a.kind == "polygon"]
    if not pos:
        return frac, centre
    r = min(_SAMPLE, int(round(extent))) if extent >= 1 else 1
    c = centre_slice(r)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not any(bx0 < x + extent and bx1 > x and by0 < y + extent and by1 > y for bx0, by0, bx1, by1 in pos):
            continue
        m = rasterize(annotations, (x, y), (r, r), downsample=extent / r, label_map=label_map) == 1
        frac[i], centre[i] = m.mean(), m[c, c].any()
    return frac, centre


def index_slide(path: Path, annotations: Optional[Sequence[Annotation]], level: int, tile_size: int, stride: int,
                min_tissue: float, label_map: Optional[Mapping[str, int]] = None,
                cache_dir: Optional[Path] = None, xml: Optional[Path] = None,
                tissue_level: Optional[int] = None, scale: float = 1.0) -> Dict[str, np.ndarray]:
    """The kept tiles of one slide: ``{"x", "y"}`` int64 ``[N]`` level-0 top-left corners, ``{"col", "row"}`` int64
    ``[N]`` grid positions (the tile's top-left corner is at ``(col, row) * stride`` output pixels), ``"tissue"``,
    ``"tumour"`` float32 ``[N]`` fractions, ``"centre"`` bool ``[N]``, plus ``"downsample"`` of ``level``,
    ``"scale"`` and ``"read"`` (level pixels read per tile: ``tile_size * scale``, rounded).

    A tile is ``tile_size`` output pixels of ``scale`` level pixels each (1.0: the level as it is); tiles tile
    ``level`` from (0, 0) every ``stride`` output pixels and lie fully inside it; a tile is kept when its tissue
    fraction (area-weighted on :func:`tissue_mask`) is >= ``min_tissue``. A broken cache file is rebuilt with a
    warning; the cache is written atomically (temp file, then ``os.replace``).
    """
    stat = path.stat()
    scale = float(scale)
    key = {"v": INDEX_VERSION, "slide": str(path.resolve()), "bytes": stat.st_size, "mtime": stat.st_mtime_ns,
           "ann": _annotation_digest(annotations), "level": level, "tile": tile_size, "stride": stride,
           "min_tissue": float(min_tissue), "labels": label_map, "tissue_level": tissue_level, "scale": scale}
    cache = Path(cache_dir) / f"{path.stem}-{_digest(key)}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    read = int(tile_size) if scale == 1.0 else max(int(round(tile_size * scale)), 1)
    step = stride * scale  # level pixels between tiles
    with open_slide(path) as slide:
        if not 0 <= level < slide.level_count:
            raise ValueError(f"{path}: level {level} out of range (the slide has levels 0..{slide.level_count - 1}; "
                             f"choose the resolution by mpp= instead of a level index)")
        lw, lh = slide.level_dimensions[level]
        if read > min(lw, lh):
            what = (f"tile_size={tile_size}" if scale == 1.0 else
                    f"tile_size={tile_size} (resampled: {read} px of level {level})")
            raise ValueError(f"{path}: {what} is larger than level {level} ({lw} x {lh} pixels)")
        if annotations:
            check_inside(annotations, slide.dimensions, str(xml or path))
        d = float(slide.level_downsamples[level])
        tmask, tds = tissue_mask(slide, level=tissue_level)
    cols = np.arange(int(np.floor((lw - read) / step + 1e-9)) + 1)
    rows = np.arange(int(np.floor((lh - read) / step + 1e-9)) + 1)
    gc, gr = np.meshgrid(cols, rows)
    gc, gr = gc.ravel(), gr.ravel()
    ext = read * d
    x0, y0 = np.round(gc * step * d), np.round(gr * step * d)
    tissue = box_fractions(tmask, np.stack([x0, y0, x0 + ext, y0 + ext], 1) / tds).astype(np.float32)
    keep = tissue >= min_tissue
    xs, ys = x0[keep].astype(np.int64), y0[keep].astype(np.int64)
    tumour, centre = _tumour(annotations or [], xs.astype(np.float64), ys.astype(np.float64), ext, label_map)
    out = {"x": xs, "y": ys, "col": gc[keep].astype(np.int64), "row": gr[keep].astype(np.int64),
           "tissue": tissue[keep], "tumour": tumour, "centre": centre, "downsample": np.float64(d),
           "scale": np.float64(scale), "read": np.int64(read)}
    if cache is not None:
        _write_cache(cache, out)
    return out


def _write_cache(cache: Path, out: Mapping[str, np.ndarray]) -> None:
    """Write a tile index atomically (temp file, then ``os.replace``); a failure only warns: the cache saves time."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **out)
        os.replace(tmp, cache)
    except OSError as e:  # a full disk or a read-only folder is not an error
        tmp.unlink(missing_ok=True)
        warnings.warn(f"{cache}: tile-index cache not written ({e}); the index is rebuilt next time", stacklevel=3)
