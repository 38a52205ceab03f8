"""Writing the demo VOC folder layout: images, annotation XML, palette masks, ``ImageSets`` and the README.

Part of the demo VOC generator: :mod:`pce.datasets.demo_voc` (the public entry point) decides where and
whether to write, :mod:`pce.datasets.demo_voc_render` draws the scenes, and :func:`_generate` here writes one
complete ``VOC2007`` folder (everything but the ``.complete`` marker) from the parameters ``p`` of
``demo_voc._params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .demo_voc_render import DEMO_CLASSES, _render
from .voc_format import VOC_PALETTE


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


def _split_ids(p: dict[str, Any]) -> dict[str, list[str]]:
    n_tr, n_va, n_te = p["num_train"], p["num_val"], p["num_test"]
    ids = [f"{i + 1:06d}" for i in range(n_tr + n_va + n_te)]
    train, val = ids[:n_tr], ids[n_tr:n_tr + n_va]
    test = ids[n_tr + n_va:] if n_te > 0 else list(val)
    return {"train": train, "val": val, "trainval": train + val, "test": test}


def _write_image(out: Path, image_id: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    """Draw image ``image_id`` (its own generator, seeded by ``p["seed"]`` and the id) and write its JPEG,
    annotation XML and class / instance masks; returns its objects."""
    rng = np.random.default_rng([p["seed"], int(image_id)])
    size = p["image_size"]
    if isinstance(size, list):
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
    else:
        h = w = size
    img, cls_mask, inst_mask, objs = _render(rng, h, w)
    Image.fromarray(img).save(out / "JPEGImages" / f"{image_id}.jpg", quality=92)
    (out / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, h, w, objs), encoding="utf-8")
    _save_palette_png(cls_mask, out / "SegmentationClass" / f"{image_id}.png")
    _save_palette_png(inst_mask, out / "SegmentationObject" / f"{image_id}.png")
    return objs


def _presence(objs: list[dict[str, Any]]) -> dict[str, int]:
    """Per class in the image: 1 when it has a non-difficult object, 0 when only difficult ones."""
    flags: dict[str, int] = {}
    for o in objs:
        f = 0 if o["difficult"] else 1
        flags[o["name"]] = max(flags.get(o["name"], -1), f)
    return flags


def _write_image_sets(out: Path, splits: dict[str, list[str]], presence: dict[str, dict[str, int]]) -> None:
    """``ImageSets/Main/{split}.txt``, ``ImageSets/Main/{cls}_{split}.txt`` (1 / -1 / 0) and
    ``ImageSets/Segmentation/{split}.txt`` (every split but test)."""
    for split, ids in splits.items():
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c in DEMO_CLASSES:
            (out / "ImageSets" / "Main" / f"{c}_{split}.txt").write_text(
                "".join(f"{i} {presence[i].get(c, -1):>2}\n" for i in ids))
        if split != "test":
            (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _generate(out: Path, p: dict[str, Any]) -> dict[str, int]:
    """Write the whole demo folder ``out`` for the parameters ``p``; returns the counts of images and objects."""
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject",
                "ImageSets/Main", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = _split_ids(p)
    all_ids = sorted(set(splits["trainval"]) | set(splits["test"]))
    presence: dict[str, dict[str, int]] = {}
    n_obj = n_diff = n_trunc = 0
    for image_id in all_ids:
        objs = _write_image(out, image_id, p)
        presence[image_id] = _presence(objs)
        n_obj += len(objs)
        n_diff += sum(o["difficult"] for o in objs)
        n_trunc += sum(o["truncated"] for o in objs)
    _write_image_sets(out, splits, presence)
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
