"""Generated whole slides for tests and the demo: pyramidal tiled TIFFs that OpenSlide opens, with tissue-like
regions on white glass, tumour-like regions of a different texture, and the matching ASAP XML (``_0`` lesions
with a ``_2`` exclusion inside one of them), laid out as Camelyon16 is (the challenge's or the AWS open-data
folders) or as Camelyon17 is (centres, patients, nodes, ``stages.csv``).

Each pyramid level is a separate top-level tiled page (``subfiletype=1`` on the reduced levels), RGB, zlib;
level 0 carries the resolution tags (``mpp``, default 2 um/px: a 2048 px slide is a 4 mm tissue fragment and its
lesions are macro-metastases of 0.5-1 mm, not isolated tumour cells, for the FROC), so OpenSlide reads levels,
downsamples and mpp.
Normal tissue: pink stroma with small, sparse nuclei; tumour: purple, dense, large nuclei.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import tifffile

from .annotations import Annotation, rasterize, write_asap_xml

__all__ = ["make_synthetic_slide", "write_pyramid_tiff", "make_demo_camelyon", "make_demo_camelyon17",
           "ensure_demo_camelyon"]

_GLASS = np.array([242, 240, 244], np.float32)
_STROMA = np.array([232, 160, 200], np.float32)
_TUMOUR = np.array([205, 130, 195], np.float32)
_NUCLEUS = np.array([90, 50, 140], np.float32)


def write_pyramid_tiff(path: str | os.PathLike, image: np.ndarray, levels: int = 4, tile: int = 256,
                       mpp: float = 2.0) -> Path:
    """Write ``image`` (uint8 [H, W, 3]) as a pyramid of ``levels`` 2x reductions (each a tiled page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = 1e4 / mpp  # pixels per centimetre at level 0
    with tifffile.TiffWriter(path) as tif:
        img = image
        for k in range(levels):
            if k:
                img = cv2.resize(img, (max(img.shape[1] // 2, 1), max(img.shape[0] // 2, 1)),
                                 interpolation=cv2.INTER_AREA)
            tif.write(img, photometric="rgb", tile=(tile, tile), compression="zlib", subfiletype=1 if k else 0,
                      resolution=(res / 2 ** k, res / 2 ** k), resolutionunit="CENTIMETER",
                      description=None if k else "PCE synthetic slide")
    return path


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 24, wobble: float = 0.3) -> np.ndarray:
    """A star-shaped polygon ``[n, 2]`` around ``(cx, cy)`` with smoothly varying radius ~``r``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    k = rng.normal(0, 1, (3, 2))
    rad = r * (1 + wobble * sum(k[i, 0] * np.sin((i + 2) * t) + k[i, 1] * np.cos((i + 2) * t)
                                for i in range(3)) / 3)
    return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)


def _nuclei(rng: np.random.Generator, region: np.ndarray, density: float, radius: int) -> np.ndarray:
    """Boolean ``[H, W]``: discs of ``radius`` at random points of ``region`` (``density`` per pixel)."""
    seeds = (rng.random(region.shape, dtype=np.float32) < density) & region
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(seeds.astype(np.uint8), k) > 0


def _lesions(rng: np.random.Generator, tissue_poly: np.ndarray, count: int) -> List[Annotation]:
    cx, cy = tissue_poly.mean(axis=0)
    r = np.linalg.norm(tissue_poly - (cx, cy), axis=1).min()
    anns = []
    for i in range(count):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.0, 0.45) * r
        lr = rng.uniform(0.25, 0.4) * r
        poly = _blob(rng, cx + d * np.cos(a), cy + d * np.sin(a), lr, n=20, wobble=0.25)
        anns.append(Annotation(f"Annotation {i}", "_0", "polygon", poly, "Polygon"))
    c = anns[0].coords.mean(axis=0)
    rin = np.linalg.norm(anns[0].coords - c, axis=1).min()
    hole = _blob(rng, c[0], c[1], 0.35 * rin, n=12, wobble=0.15)
    anns.append(Annotation(f"Annotation {count}", "_2", "polygon", hole, "Polygon"))
    return anns


def make_synthetic_slide(path: str | os.PathLike, xml_path: Optional[str | os.PathLike] = None,
                         size: Tuple[int, int] = (2048, 1536), tumour: bool = True, seed: int = 0,
                         levels: int = 4, tile: int = 256, mpp: float = 2.0) -> Dict[str, object]:
    """Write one slide of ``size=(w, h)`` level-0 pixels (and, with ``tumour``, its ASAP XML at ``xml_path``).

    Returns ``{"slide": path, "xml": path or None, "annotations": [...], "tissue": bool [h, w]}``
    (the level-0 tissue region the image was drawn from).
    """
    rng = np.random.default_rng(seed)
    w, h = int(size[0]), int(size[1])
    tissue_poly = _blob(rng, w * rng.uniform(0.45, 0.55), h * rng.uniform(0.45, 0.55), 0.36 * min(w, h),
                        n=32, wobble=0.2)
    tissue_poly[:, 0] = 0.5 * w + (tissue_poly[:, 0] - 0.5 * w) * (w / min(w, h)) * 0.95
    tissue = rasterize([Annotation("tissue", "t", "polygon", tissue_poly)], (0, 0), (w, h),
                       label_map={"t": 1}).astype(bool)
    anns = _lesions(rng, tissue_poly, int(rng.integers(1, 3))) if tumour else []
    lesion = rasterize(anns, (0, 0), (w, h)).astype(bool) & tissue if anns else np.zeros_like(tissue)
    normal = tissue & ~lesion
    img = np.broadcast_to(_GLASS, (h, w, 3)).copy()
    img[normal] = _STROMA
    img[lesion] = _TUMOUR
    shade = cv2.resize(rng.normal(0, 10, (h // 64 + 1, w // 64 + 1, 3)).astype(np.float32), (w, h))
    img[tissue] += shade[tissue]
    img[_nuclei(rng, normal, 0.004, 2)] = _NUCLEUS
    img[_nuclei(rng, lesion, 0.006, 5)] = _NUCLEUS * 0.8
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    write_pyramid_tiff(path, np.clip(img, 0, 255).astype(np.uint8), levels=levels, tile=tile, mpp=mpp)
    xml = write_asap_xml(xml_path, anns) if (tumour and xml_path is not None) else None
    return {"slide": Path(path), "xml": xml, "annotations": anns, "tissue": tissue}


# where each kind of generated slide goes: (slide folder, annotation folder) per layout
_DEMO_FOLDERS = {
    "challenge": {"tumor": ("training/tumor", "lesion_annotations"), "normal": ("training/normal", None),
                  "test": ("testing/images", "testing/lesion_annotations")},
    "aws": {"tumor": ("CAMELYON16/images", "CAMELYON16/annotations"), "normal": ("CAMELYON16/images", None),
            "test": ("CAMELYON16/images", "CAMELYON16/annotations")},
}


def make_demo_camelyon(root: str | os.PathLike, num_tumour: int = 8, num_normal: int = 4, num_test_tumour: int = 3,
                       num_test_normal: int = 1, size: Tuple[int, int] = (2048, 1536), seed: int = 0,
                       layout: str = "challenge") -> Path:
    """Generate the demo set under ``root`` in a Camelyon16 layout: ``"challenge"`` (``training/{tumor,normal}/``,
    ``lesion_annotations/tumor_*.xml``, ``testing/images/test_*.tif``, ``testing/lesion_annotations/``) or
    ``"aws"`` (``CAMELYON16/images/{tumor,normal,test}_*.tif``, ``CAMELYON16/annotations/*.xml``)."""
    if layout not in _DEMO_FOLDERS:
        raise ValueError(f"layout={layout!r} (expected one of {sorted(_DEMO_FOLDERS)})")
    folders = _DEMO_FOLDERS[layout]
    root = Path(root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    specs = ([(*folders["tumor"], f"tumor_{i + 1:03d}", True) for i in range(num_tumour)]
             + [(*folders["normal"], f"normal_{i + 1:03d}", False) for i in range(num_normal)]
             + [(*folders["test"], f"test_{i + 1:03d}", i < num_test_tumour)
                for i in range(num_test_tumour + num_test_normal)])
    for k, (folder, xml_dir, stem, tum) in enumerate(specs):
        xml = tmp / xml_dir / f"{stem}.xml" if tum else None
        make_synthetic_slide(tmp / folder / f"{stem}.tif", xml, size=size, tumour=tum, seed=seed * 1000 + k)
    (tmp / "DEMO.json").write_text(json.dumps({"generator": "pce.datasets.camelyon.synthetic", "seed": seed,
                                               "size": list(size), "slides": len(specs), "layout": layout}))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def make_demo_camelyon17(root: str | os.PathLike, patients: int = 2, nodes: int = 2, size: Tuple[int, int] = (768, 512),
                         seed: int = 0, annotate: bool = True) -> Path:
    """Generated slides in Camelyon17's layout: ``centre_<c>/patient_<p>_node_<n>.tif`` (patient ``p`` in centre
    ``p % 5``), ``stages.csv`` (``patient,stage``: ``patient_<p>.zip,pN..`` and ``patient_<p>_node_<n>.tif,<label>``
    with labels ``negative`` / ``macro``) and, with ``annotate``, ``lesion_annotations/<stem>.xml`` of the tumour
    slides. Node 0 of every patient holds tumour; the others are negative."""
    root = Path(root)
    rows = ["patient,stage"]
    k = 0
    for p in range(patients):
        labels = []
        for n in range(nodes):
            stem = f"patient_{p:03d}_node_{n}"
            tum = n == 0
            xml = root / "lesion_annotations" / f"{stem}.xml" if (tum and annotate) else None
            make_synthetic_slide(root / f"centre_{p % 5}" / f"{stem}.tif", xml, size=size, tumour=tum,
                                 seed=seed * 1000 + k, levels=3, tile=128)
            labels.append((stem, "macro" if tum else "negative"))
            k += 1
        rows.append(f"patient_{p:03d}.zip,pN1")
        rows += [f"{stem}.tif,{lab}" for stem, lab in labels]
    (root / "stages.csv").write_text("\n".join(rows) + "\n")
    return root


def ensure_demo_camelyon(root: str | os.PathLike, **kwargs) -> Path:
    """Generate the demo set under ``root`` unless a complete one (``DEMO.json``) is there."""
    root = Path(root)
    if (root / "DEMO.json").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists but is not a complete generated demo set (no DEMO.json); "
                              f"remove it or point data.root elsewhere")
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    return make_demo_camelyon(root, **kwargs)
