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
"""

from __future__ import annotations

import colorsys
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .voc import VOC_PALETTE

__all__ = ["DEMO_CLASSES", "make_demo_voc", "ensure_demo_voc", "demo_voc_is_complete"]

DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")

_GENERATOR_VERSION = 1
_MARKER = ".complete"
# preferred hue (0..1) per class; each object samples hue within +-_HUE_SPREAD (ranges overlap)
_CLASS_HUE = {"circle": 0.03, "square": 0.58, "triangle": 0.30, "star": 0.82}
_HUE_SPREAD = 0.22
_SIZE_RANGE = (0.12, 0.45)
_DEFAULTS: dict[str, Any] = {"num_train": 400, "num_val": 100, "num_test": 0, "image_size": 128, "seed": 0}  # object size as a fraction of the shorter image side


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1], float32 [h, w, channels] (bicubic upsampling of a coarse grid)."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    up = Image.fromarray(grid if channels == 3 else grid[..., 0]).resize((w, h), Image.BICUBIC)
    arr = np.asarray(up, dtype=np.float32) / 255.0
    return arr if channels == 3 else arr[..., None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(0.25, 0.75, size=3).astype(np.float32)
    img = base + rng.uniform(0.25, 0.55) * (_smooth_noise(rng, h, w, int(rng.integers(3, 6))) - 0.5)
    img += rng.uniform(0.05, 0.2) * (_smooth_noise(rng, h, w, int(rng.integers(10, 20)), 1) - 0.5)
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):  # unlabelled clutter: thin lines / arcs
        pts = [float(v) for v in rng.uniform(0, 1, 4) * np.array([w, h, w, h])]
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line(pts, fill=col, width=int(rng.integers(1, 3)))
        else:
            x0, x1 = sorted(pts[0::2])
            y0, y1 = sorted(pts[1::2])
            draw.arc([x0, y0, x1 + 1, y1 + 1], float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=col)
    img = np.asarray(canvas, dtype=np.float32) / 255.0
    return img + rng.normal(0, 0.035, img.shape).astype(np.float32)


def _shape_mask(rng: np.random.Generator, cls: str, s: int) -> np.ndarray:
    """Boolean [ph, pw] mask of one shape whose extent is about s pixels."""
    if cls == "circle":
        ph, pw = max(4, round(s * rng.uniform(0.85, 1.0))), s
        if rng.random() < 0.5:
            ph, pw = pw, ph
        im = Image.new("L", (pw, ph), 0)
        ImageDraw.Draw(im).ellipse([0, 0, pw - 1, ph - 1], fill=255)
        return np.asarray(im) > 0
    im = Image.new("L", (s, s), 0)
    c = (s - 1) / 2.0
    r = (s - 1) / 2.0
    if cls == "square":
        th = np.deg2rad(rng.uniform(-20, 20))
        half = r / (abs(np.cos(th)) + abs(np.sin(th)))
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
        pts = [(c + x * np.cos(th) - y * np.sin(th), c + x * np.sin(th) + y * np.cos(th)) for x, y in corners]
    elif cls == "triangle":
        th0 = rng.uniform(0, 2 * np.pi)
        angs = th0 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        pts = [(c + r * np.cos(a), c + r * np.sin(a)) for a in angs]
    elif cls == "star":
        th0 = rng.uniform(0, 2 * np.pi)
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * inner
            a = th0 + k * np.pi / 5
            pts.append((c + rad * np.cos(a), c + rad * np.sin(a)))
    else:  # pragma: no cover - guarded by DEMO_CLASSES
        raise ValueError(cls)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in pts], fill=255)
    m = np.asarray(im) > 0
    ys, xs = np.nonzero(m)  # crop to the tight extent so the patch box is the shape box
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _texture(rng: np.random.Generator, cls: str, ph: int, pw: int) -> np.ndarray:
    """Float32 [ph, pw, 3] class-specific texture with a randomly sampled colour."""
    hue = (_CLASS_HUE[cls] + rng.uniform(-_HUE_SPREAD, _HUE_SPREAD)) % 1.0
    col = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 0.95), rng.uniform(0.45, 0.95)), dtype=np.float32)
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    if cls == "circle":  # smooth radial shading with an off-centre highlight
        cy, cx = ph * rng.uniform(0.3, 0.5), pw * rng.uniform(0.3, 0.5)
        r2 = ((yy - cy) / ph) ** 2 + ((xx - cx) / pw) ** 2
        tex = col * np.clip(1.25 - 1.6 * r2, 0.35, 1.25)[..., None]
    elif cls == "square":  # stripes
        period = rng.uniform(4, 8)
        phi = rng.uniform(0, np.pi)
        t = (np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period) > 0).astype(np.float32)
        tex = col * (0.5 + 0.5 * t)[..., None]
    elif cls == "triangle":  # checkerboard, dark/light
        cell = int(rng.integers(3, 7))
        t = ((yy // cell + xx // cell) % 2).astype(np.float32)[..., None]
        tex = col * (1 - t) + (0.45 * col + 0.55) * t * rng.uniform(0.7, 1.0)
    else:  # star: grainy speckle
        tex = col * rng.uniform(0.45, 1.35, (ph, pw, 1)).astype(np.float32)
    return tex + rng.normal(0, 0.03, (ph, pw, 3)).astype(np.float32)


def _void_band(visible: np.ndarray) -> np.ndarray:
    """~3 px band around the outline of a boolean region (1 px outside, ~2 px inside).

    The inside part shrinks for tiny/thin regions so that some class pixels always remain.
    """
    im = Image.fromarray(visible.astype(np.uint8) * 255)
    dil = np.asarray(im.filter(ImageFilter.MaxFilter(3))) > 0
    n = int(visible.sum())
    for k in (5, 3):
        ero = np.asarray(im.filter(ImageFilter.MinFilter(k))) > 0
        if ero.sum() >= 0.3 * n:
            return dil & ~ero
    return dil & ~visible


def _render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One image: (rgb uint8 [h, w, 3], class mask uint8 [h, w], instance mask uint8 [h, w], objects)."""
    img = _background(rng, h, w)
    inst = np.zeros((h, w), dtype=np.int32)  # 0 = background, k+1 = object k
    side = min(h, w)
    objs: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = DEMO_CLASSES[int(rng.integers(0, len(DEMO_CLASSES)))]
        s = max(6, round(side * rng.uniform(*_SIZE_RANGE)))
        shape = _shape_mask(rng, cls, s)
        ph, pw = shape.shape
        full_area = int(shape.sum())
        tex = _texture(rng, cls, ph, pw)
        k = len(objs) + 1
        for _attempt in range(10):
            if rng.random() < 0.12:  # may leave the frame
                y0 = int(rng.integers(-ph // 3, max(-ph // 3 + 1, h - 2 * ph // 3)))
                x0 = int(rng.integers(-pw // 3, max(-pw // 3 + 1, w - 2 * pw // 3)))
            else:
                y0 = int(rng.integers(0, max(1, h - ph + 1)))
                x0 = int(rng.integers(0, max(1, w - pw + 1)))
            ya, yb, xa, xb = max(0, y0), min(h, y0 + ph), max(0, x0), min(w, x0 + pw)
            if yb <= ya or xb <= xa:
                continue
            sub = shape[ya - y0:yb - y0, xa - x0:xb - x0]
            if sub.sum() < 0.5 * full_area:
                continue
            trial = inst.copy()
            trial[ya:yb, xa:xb][sub] = k
            if any(int((trial == o["k"]).sum()) < max(0.3 * o["full_area"], 20) for o in objs):
                continue
            inst = trial
            region = img[ya:yb, xa:xb]
            region[sub] = tex[ya - y0:yb - y0, xa - x0:xb - x0][sub]
            objs.append({"k": k, "name": cls, "full_area": full_area, "size": s,
                         "in_frame": float(sub.sum()) / full_area})
            break
    img = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)))

    cls_mask = np.zeros((h, w), dtype=np.uint8)
    inst_mask = np.zeros((h, w), dtype=np.uint8)
    void = np.zeros((h, w), dtype=bool)
    for o in objs:
        vis = inst == o["k"]
        ys, xs = np.nonzero(vis)
        frac = len(ys) / o["full_area"]
        # VOC boxes: visible extent, 1-based inclusive pixel indices
        o["bndbox"] = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)
        o["truncated"] = int(o["in_frame"] < 0.95 or frac < 0.6)
        o["difficult"] = int(o["size"] < 0.14 * side or frac < 0.4)
        cls_mask[vis] = DEMO_CLASSES.index(o["name"]) + 1
        inst_mask[vis] = o["k"]
        void |= _void_band(vis)
    cls_mask[void] = 255
    inst_mask[void] = 255
    return img, cls_mask, inst_mask, objs


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _xml(image_id: str, h: int, w: int, objs: list[dict]) -> str:
    lines = [
        "<annotation>",
        "\t<folder>VOC2007</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>PCE demo VOC-format shapes</database>",
        "\t\t<annotation>PASCAL VOC2007</annotation>",
        "\t\t<image>procedural</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{w}</width>",
        f"\t\t<height>{h}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for o in objs:
        x1, y1, x2, y2 = o["bndbox"]
        lines += [
            "\t<object>",
            f"\t\t<name>{o['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{o['truncated']}</truncated>",
            f"\t\t<difficult>{o['difficult']}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>",
            f"\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _save_palette_png(arr: np.ndarray, path: Path) -> None:
    im = Image.fromarray(arr)
    im.putpalette(VOC_PALETTE)
    im.save(path, optimize=False)


def _params(num_train: int, num_val: int, num_test: int, image_size: Any, seed: int) -> dict[str, Any]:
    size = list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
    return {"num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
            "image_size": size, "seed": int(seed), "classes": list(DEMO_CLASSES),
            "version": _GENERATOR_VERSION}


def _split_ids(p: dict[str, Any]) -> dict[str, list[str]]:
    n_tr, n_va, n_te = p["num_train"], p["num_val"], p["num_test"]
    ids = [f"{i + 1:06d}" for i in range(n_tr + n_va + n_te)]
    train, val = ids[:n_tr], ids[n_tr:n_tr + n_va]
    test = ids[n_tr + n_va:] if n_te > 0 else list(val)
    return {"train": train, "val": val, "trainval": train + val, "test": test}


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
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png")):
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


def _generate(out: Path, p: dict[str, Any]) -> dict[str, int]:
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                "ImageSets/Main", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = _split_ids(p)
    all_ids = sorted(set(splits["trainval"]) | set(splits["test"]))
    presence: dict[str, dict[str, int]] = {}
    n_obj = n_diff = n_trunc = 0
    size = p["image_size"]
    for image_id in all_ids:
        rng = np.random.default_rng([p["seed"], int(image_id)])
        if isinstance(size, list):
            h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        else:
            h = w = size
        img, cls_mask, inst_mask, objs = _render(rng, h, w)
        Image.fromarray(img).save(out / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (out / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, h, w, objs), encoding="utf-8")
        _save_palette_png(cls_mask, out / "SegmentationClass" / f"{image_id}.png")
        _save_palette_png(inst_mask, out / "SegmentationObject" / f"{image_id}.png")
        flags = {}
        for o in objs:
            f = 0 if o["difficult"] else 1
            flags[o["name"]] = max(flags.get(o["name"], -1), f)
        presence[image_id] = flags
        n_obj += len(objs)
        n_diff += sum(o["difficult"] for o in objs)
        n_trunc += sum(o["truncated"] for o in objs)
    for split, ids in splits.items():
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c in DEMO_CLASSES:
            (out / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text(
                "".join(f"{i} {presence[i].get(c, -1):>2}\n" for i in ids))
        if split != "test":
            (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    counts = {"images": len(all_ids), "train": len(splits["train"]), "val": len(splits["val"]),
              "test": len(splits["test"]), "objects": n_obj, "difficult": n_diff, "truncated": n_trunc}
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in DEMO_CLASSES))
    (out / "DEMO_README.txt").write_text(_readme(p, counts))
    return counts


def _readme(p: dict[str, Any], counts: dict[str, int]) -> str:
    return f"""PCE demo dataset in PASCAL VOC2007 format (procedurally generated, not real photos)
=================================================================================

Generated by pce.datasets.demo_voc.make_demo_voc (generator version {p['version']}) with
num_train={p['num_train']} num_val={p['num_val']} num_test={p['num_test']} image_size={p['image_size']} seed={p['seed']}.

Classes (label 1..{len(DEMO_CLASSES)}, 0 = background): {', '.join(DEMO_CLASSES)}   (also in classes.txt)
  circle   - ellipse/disc, smooth radial shading
  square   - square rotated up to 20 deg, stripes
  triangle - randomly rotated triangle, checkerboard
  star     - five-pointed star, grainy speckle
Each class prefers a hue range, but ranges are broad and overlap: colour alone is not enough.

Counts: {counts['images']} images ({counts['train']} train, {counts['val']} val, {counts['test']} test),
{counts['objects']} objects, {counts['difficult']} difficult, {counts['truncated']} truncated.
test.txt lists the val images unless num_test > 0.

Layout (same as VOCdevkit/VOC2007):
  JPEGImages/ID.jpg, Annotations/ID.xml (boxes = visible extent, 1-based inclusive ints),
  SegmentationClass/ID.png (palette PNG: class index per pixel, 255 = void border around outlines),
  SegmentationObject/ID.png (instance index per pixel, 255 = void),
  ImageSets/Main/{{train,val,trainval,test}}.txt and CLASS_SPLIT.txt (1 / -1 / 0 = difficult only),
  ImageSets/Segmentation/{{train,val,trainval}}.txt.
truncated=1: heavily occluded (<60% visible) or cut by the image border.
difficult=1: very small (<14% of the image side) or mostly hidden (<40% visible).

Load with:
  from pce.datasets.voc import VOCDetection, VOCSegmentation
  from pce.datasets.demo_voc import DEMO_CLASSES
  VOCDetection(ROOT, year="2007", image_set="train", classes=DEMO_CLASSES)
  VOCSegmentation(ROOT, year="2007", image_set="train", classes=DEMO_CLASSES)
where ROOT is the folder that contains VOCdevkit/.
"""


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
    if num_train < 0 or num_val < 0 or num_test < 0 or num_train + num_val + num_test == 0:
        raise ValueError("num_train, num_val, num_test must be >= 0 and not all 0")
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or not 32 <= image_size[0] <= image_size[1]:
            raise ValueError(f"image_size range must be (lo, hi) with 32 <= lo <= hi, got {image_size}")
    elif int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    root = Path(root).expanduser().resolve()
    p = _params(num_train, num_val, num_test, image_size, seed)
    kw = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "image_size": image_size, "seed": seed}
    devkit = root / "VOCdevkit"
    target = devkit / "VOC2007"
    if not overwrite and demo_voc_is_complete(root, **kw):
        return root
    if target.exists() and not overwrite:
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
                          stacklevel=2)
    _check_own_folder(devkit)
    devkit.mkdir(parents=True, exist_ok=True)
    # remove stale temporaries of interrupted runs (older than 1 h, so concurrent runs are untouched)
    for d in devkit.glob(".VOC2007.*"):
        try:
            if time.time() - d.stat().st_mtime > 3600:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
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


def ensure_demo_voc(root: str | os.PathLike, **kwargs: Any) -> Path:
    """Return ``root`` after generating the demo dataset there if it is missing or incomplete."""
    kwargs.pop("overwrite", None)
    return make_demo_voc(root, overwrite=False, **kwargs)
