"""Procedural toy dataset written in exactly the PASCAL VOC layout (for offline demos and tests).

``make_demo_voc(root)`` writes ``root/VOCdevkit/VOC2007/`` with ``JPEGImages/*.jpg``,
``Annotations/*.xml`` (real VOC schema, 1-based inclusive integer boxes), ``SegmentationClass/*.png``
and ``SegmentationObject/*.png`` (palette PNGs with ``VOC_PALETTE``, 255 = void border around
object outlines as in real VOC), ``ImageSets/Main/{train,val,trainval,test}.txt`` (+ per-class
``{cls}_{split}.txt``) and ``ImageSets/Segmentation/{train,val,trainval}.txt``, plus
``classes.txt``, ``DEMO_README.txt`` and a ``.complete`` marker written last.

Each image shows 1-4 shapes from :data:`DEMO_CLASSES` on a noisy, textured background. Every class
has its own shape and texture (radial shading, stripes, checkers, speckle) and a preferred but
broad, overlapping hue range, so colour alone does not identify the class. Later objects may
occlude earlier ones; boxes enclose the visible part (VOC convention); heavily occluded or
frame-cut objects are ``truncated``; very small or mostly hidden ones are ``difficult``.
Load it with ``VOCDetection(root, year="2007", classes=DEMO_CLASSES)`` /
``VOCSegmentation(root, year="2007", classes=DEMO_CLASSES)``.

This module is the generator's public entry point: its parameters, the completeness check and the life cycle
of the folder (idempotence, refusing to overwrite other data, atomic replacement). The scenes are drawn in
:mod:`pce.datasets.demo_voc_render`, the VOC folder layout is written by :mod:`pce.datasets.demo_voc_files`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .demo_voc_files import _generate
from .demo_voc_render import DEMO_CLASSES

__all__ = ["DEMO_CLASSES", "make_demo_voc", "ensure_demo_voc", "demo_voc_is_complete"]

_GENERATOR_VERSION = 1
_MARKER = ".complete"
_DEFAULTS: dict[str, Any] = {"num_train": 400, "num_val": 100, "num_test": 0, "image_size": 128, "seed": 0}


def _params(num_train: int, num_val: int, num_test: int, image_size: Any, seed: int) -> dict[str, Any]:
    size = list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
    return {"num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
            "image_size": size, "seed": int(seed), "classes": list(DEMO_CLASSES),
            "version": _GENERATOR_VERSION}


def demo_voc_is_complete(root: str | os.PathLike, **params: Any) -> bool:
    """True if ``root`` holds a complete demo dataset: marker present, all files there and, when any
    of make_demo_voc's parameters are given (others default as in make_demo_voc), the same parameters."""
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    marker = voc / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if params and info.get("params") != _params(**{**_DEFAULTS, **params}):
        return False
    p = info.get("params", {})
    try:
        n = p["num_train"] + p["num_val"] + p["num_test"]
    except (KeyError, TypeError):
        return False
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png"),
                     ("SegmentationObject", ".png")):
        d = voc / sub
        if not d.is_dir() or sum(1 for f in os.scandir(d) if f.name.endswith(ext)) != n:
            return False
    for split in ("train", "val", "trainval", "test"):
        if not (voc / "ImageSets" / "Main" / f"{split}.txt").is_file():
            return False
    for split in ("train", "val", "trainval"):
        if not (voc / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
            return False
    return True


_OWN_FILES = re.compile(
    r"^(JPEGImages/\d{6}\.jpg|Annotations/\d{6}\.xml|Segmentation(Class|Object)/\d{6}\.png|"
    r"ImageSets/Main/(\w+_)?(train|val|trainval|test)\.txt|ImageSets/Segmentation/(train|val|trainval)\.txt|"
    r"classes\.txt|DEMO_README\.txt|\.complete)$")


def _user_files(target: Path) -> list[Path]:
    """Files in a demo ``VOC2007`` folder the generator did not write, or changed after it finished (the
    ``.complete`` marker is written last): the user's, never to be deleted."""
    marker = target / _MARKER
    done = marker.stat().st_mtime if marker.is_file() else None
    out = []
    for dirpath, _, files in os.walk(target):
        for f in files:
            path = Path(dirpath) / f
            rel = path.relative_to(target).as_posix()
            if not _OWN_FILES.match(rel) or (done is not None and path.stat().st_mtime > done + 2.0):
                out.append(path)
    return sorted(out)


def _check_own_folder(devkit: Path) -> None:
    """The demo set lives in a ``VOCdevkit`` of its own: refuse one that holds other data (e.g. real VOC2012)."""
    if not devkit.is_dir():
        return
    other = sorted(p.name for p in devkit.iterdir() if p.name != "VOC2007" and not p.name.startswith(".VOC2007."))
    if other:
        raise FileExistsError(f"{devkit}: holds {other}, not only the demo set; the demo data goes into a folder "
                              "of its own (expected a root such as data/demo_voc)")


def _check_args(num_train: int, num_val: int, num_test: int, image_size: int | tuple[int, int]) -> None:
    if num_train < 0 or num_val < 0 or num_test < 0 or num_train + num_val + num_test == 0:
        raise ValueError("num_train, num_val, num_test must be >= 0 and not all 0")
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or not 32 <= image_size[0] <= image_size[1]:
            raise ValueError(f"image_size range must be (lo, hi) with 32 <= lo <= hi, got {image_size}")
    elif int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")


def _check_replaceable(target: Path) -> None:
    """An existing ``target`` may be regenerated only when it is an untouched demo set (FileExistsError
    otherwise); warns when it was a complete one (other parameters or missing files)."""
    ours = (target / _MARKER).exists() or (target / "DEMO_README.txt").exists()
    if not ours:
        raise FileExistsError(
            f"{target} exists and is not a PCE demo dataset (no {_MARKER} or DEMO_README.txt); "
            "refusing to replace it. Use another root or overwrite=True."
        )
    mine = _user_files(target)
    if mine:
        raise FileExistsError(
            f"{mine[0]}: added or changed after the demo set was generated ({len(mine)} such file(s) in "
            f"{target}); refusing to regenerate the demo set with other parameters over them (expected an "
            "untouched demo folder: use another root for the demo, or move your files out)")
    if (target / _MARKER).exists():
        warnings.warn(f"demo dataset at {target} has different parameters or missing files; regenerating",
                      stacklevel=3)


def _remove_stale(devkit: Path) -> None:
    """Remove temporaries of interrupted runs (older than 1 h, so concurrent runs are untouched)."""
    for d in devkit.glob(".VOC2007.*"):
        try:
            if time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _generate_into_place(root: Path, p: dict[str, Any], kw: dict[str, Any]) -> Path:
    """Generate into a temporary sibling of ``VOC2007``, write the marker, then swap it into place."""
    devkit = root / "VOCdevkit"
    target = devkit / "VOC2007"
    tmp = devkit / f".VOC2007.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        counts = _generate(tmp, p)
        (tmp / _MARKER).write_text(json.dumps({"params": p, "counts": counts}, indent=1, sort_keys=True))
        old = None
        if target.exists():
            old = devkit / f".VOC2007.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            # another process finished first: accept its result if it is what we want
            if demo_voc_is_complete(root, **kw):
                return root
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_demo_voc(
    root: str | os.PathLike,
    num_train: int = 400,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    overwrite: bool = False,
    num_test: int = 0,
) -> Path:
    """Write the demo dataset under ``root/VOCdevkit/VOC2007`` and return ``root`` (contains VOCdevkit).

    ``image_size`` is the side of square images, or ``(lo, hi)`` to draw each image's height and
    width in [lo, hi]. Deterministic given the parameters (image ``i`` depends only on ``seed`` and
    ``i``). Idempotent: returns at once if a complete dataset with the same parameters exists
    (``.complete`` marker, written last). The data are generated in a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a half dataset that looks complete. An
    existing demo dataset with other parameters or missing files is regenerated; an existing
    ``VOC2007`` folder that is not a demo dataset raises FileExistsError unless ``overwrite=True``.
    """
    _check_args(num_train, num_val, num_test, image_size)
    root = Path(root).expanduser().resolve()
    p = _params(num_train, num_val, num_test, image_size, seed)
    kw = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "image_size": image_size, "seed": seed}
    devkit = root / "VOCdevkit"
    target = devkit / "VOC2007"
    if not overwrite and demo_voc_is_complete(root, **kw):
        return root
    if target.exists() and not overwrite:
        _check_replaceable(target)
    _check_own_folder(devkit)
    devkit.mkdir(parents=True, exist_ok=True)
    _remove_stale(devkit)
    return _generate_into_place(root, p, kw)


def ensure_demo_voc(root: str | os.PathLike, **kwargs: Any) -> Path:
    """Return ``root`` after generating the demo dataset there if it is missing or incomplete."""
    kwargs.pop("overwrite", None)
    return make_demo_voc(root, overwrite=False, **kwargs)
