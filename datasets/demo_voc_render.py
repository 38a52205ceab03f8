"""Drawing the procedural demo scenes: noisy textured backgrounds, one shape per object, masks and boxes.

Part of the demo VOC generator (:mod:`pce.datasets.demo_voc`, the public entry point, with the parameters and
the folder's life cycle; :mod:`pce.datasets.demo_voc_files` writes the VOC folder layout). :func:`_render`
draws one image from a seeded generator; the order of the generator's draws fixes the data, so any change
here changes every generated file.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DEMO_CLASSES"]

DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# preferred hue (0..1) per class; each object samples hue within +-_HUE_SPREAD (ranges overlap)
_CLASS_HUE = {"circle": 0.03, "square": 0.58, "triangle": 0.30, "star": 0.82}
_HUE_SPREAD = 0.22
_SIZE_RANGE = (0.12, 0.45)  # object size as a fraction of the shorter image side


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


def _offset(rng: np.random.Generator, ph: int, pw: int, h: int, w: int) -> tuple[int, int]:
    """Top-left corner ``(y0, x0)`` of a ``ph x pw`` patch: inside the image, or (12%) partly outside it."""
    if rng.random() < 0.12:  # may leave the frame
        y0 = int(rng.integers(-ph // 3, max(-ph // 3 + 1, h - 2 * ph // 3)))
        x0 = int(rng.integers(-pw // 3, max(-pw // 3 + 1, w - 2 * pw // 3)))
    else:
        y0 = int(rng.integers(0, max(1, h - ph + 1)))
        x0 = int(rng.integers(0, max(1, w - pw + 1)))
    return y0, x0


def _place_object(rng: np.random.Generator, img: np.ndarray, inst: np.ndarray, objs: list[dict[str, Any]],
                  cls: str, s: int) -> np.ndarray:
    """Draw one ``cls`` shape of extent ``s`` into ``img`` (in place) where it hides no earlier object too much
    (10 tries); on success append it to ``objs``. Returns the instance map (``inst`` when nothing was placed)."""
    h, w = inst.shape
    shape = _shape_mask(rng, cls, s)
    ph, pw = shape.shape
    full_area = int(shape.sum())
    tex = _texture(rng, cls, ph, pw)
    k = len(objs) + 1
    for _attempt in range(10):
        y0, x0 = _offset(rng, ph, pw, h, w)
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
        region = img[ya:yb, xa:xb]
        region[sub] = tex[ya - y0:yb - y0, xa - x0:xb - x0][sub]
        objs.append({"k": k, "name": cls, "full_area": full_area, "size": s,
                     "in_frame": float(sub.sum()) / full_area})
        return trial
    return inst


def _annotate(inst: np.ndarray, objs: list[dict[str, Any]], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Class and instance masks (uint8, 255 = void band around outlines) of the instance map ``inst``; adds each
    object's VOC ``bndbox`` (visible extent), ``truncated`` and ``difficult``."""
    h, w = inst.shape
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
    return cls_mask, inst_mask


def _render(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One image: (rgb uint8 [h, w, 3], class mask uint8 [h, w], instance mask uint8 [h, w], objects)."""
    img = _background(rng, h, w)
    inst = np.zeros((h, w), dtype=np.int32)  # 0 = background, k+1 = object k
    side = min(h, w)
    objs: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = DEMO_CLASSES[int(rng.integers(0, len(DEMO_CLASSES)))]
        s = max(6, round(side * rng.uniform(*_SIZE_RANGE)))
        inst = _place_object(rng, img, inst, objs, cls, s)
    img = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)))
    cls_mask, inst_mask = _annotate(inst, objs, side)
    return img, cls_mask, inst_mask, objs
