"""Procedural VOC-format demo dataset: format, consistency with the readers, determinism, idempotency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pce.datasets import demo_voc
from pce.datasets.demo_voc import DEMO_CLASSES, demo_voc_is_complete, ensure_demo_voc, make_demo_voc
from pce.datasets.voc import VOCDetection, VOCSegmentation
from pce.datasets.voc_format import VOC_PALETTE, parse_voc_xml

REPO = Path(__file__).resolve().parents[1]
KW = dict(num_train=8, num_val=4, image_size=96, seed=0)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_voc(tmp_path_factory.mktemp("demo"), **KW)


def test_layout(demo_root):
    voc = demo_root / "VOCdevkit" / "VOC2007"
    main = voc / "ImageSets" / "Main"
    seg = voc / "ImageSets" / "Segmentation"
    read = lambda p: p.read_text().split()  # noqa: E731
    assert read(main / "train.txt") == [f"{i:06d}" for i in range(1, 9)]
    assert read(main / "val.txt") == [f"{i:06d}" for i in range(9, 13)]
    assert read(main / "trainval.txt") == read(main / "train.txt") + read(main / "val.txt")
    assert read(main / "test.txt") == read(main / "val.txt")
    for s in ("train", "val", "trainval"):
        assert read(seg / f"{s}.txt") == read(main / f"{s}.txt")
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 12
    assert len(list((voc / "SegmentationClass").glob("*.png"))) == 12
    assert (voc / "classes.txt").read_text().split() == list(DEMO_CLASSES)
    assert (voc / "DEMO_README.txt").is_file()
    info = json.loads((voc / ".complete").read_text())
    assert info["params"]["num_train"] == 8 and info["counts"]["images"] == 12
    assert 3 <= len(DEMO_CLASSES) <= 5
    # per-class image lists in VOC format ("id  1" / "id -1" / "id  0")
    lines = (main / f"{DEMO_CLASSES[0]}_train.txt").read_text().splitlines()
    assert len(lines) == 8 and all(ln.split()[1] in ("1", "-1", "0") for ln in lines)
    # real VOC XML schema
    a = parse_voc_xml(voc / "Annotations" / "000001.xml", DEMO_CLASSES)
    assert a["filename"] == "000001.jpg" and a["size"] == (96, 96, 3)
    assert 1 <= len(a["objects"]) <= 4
    for o in a["objects"]:
        x1, y1, x2, y2 = o["bndbox"]
        assert all(float(v).is_integer() for v in o["bndbox"]) and 1 <= x1 <= x2 <= 96 and 1 <= y1 <= y2 <= 96
        assert o["pose"] == "Unspecified"
    with Image.open(voc / "SegmentationClass" / "000001.png") as m:
        assert m.mode == "P" and m.getpalette()[:30] == VOC_PALETTE[:30]


def test_readers_and_mask_box_agreement(demo_root):
    det = VOCDetection(demo_root, year="2007", image_set="trainval", classes=DEMO_CLASSES)
    seg = VOCSegmentation(demo_root, year="2007", image_set="trainval", classes=DEMO_CLASSES)
    assert len(det) == len(seg) == 12 and det.ids == seg.ids
    voc = demo_root / "VOCdevkit" / "VOC2007"
    n_void = 0
    n_obj = 0
    for i in range(len(det)):
        img, t = det[i]
        img2, mask = seg[i]
        assert img.shape == (3, 96, 96) and torch.equal(img, img2)
        assert mask.shape == (96, 96) and mask.dtype == torch.int64
        vals = set(mask.unique().tolist())
        assert vals <= set(range(len(DEMO_CLASSES) + 1)) | {255}
        n_void += int((mask == 255).sum())
        boxes, labels, diff = t["boxes"], t["labels"], t["difficult"]
        assert ((labels >= 1) & (labels <= len(DEMO_CLASSES))).all()
        # every pixel of class c lies inside some box of class c
        for c in range(1, len(DEMO_CLASSES) + 1):
            ys, xs = torch.nonzero(mask == c, as_tuple=True)
            if len(ys) == 0:
                continue
            cb = boxes[labels == c]
            assert len(cb) > 0, f"image {det.ids[i]}: class {c} pixels but no box"
            px, py = xs.float() + 0.5, ys.float() + 0.5
            inside = ((px[:, None] > cb[:, 0]) & (px[:, None] < cb[:, 2])
                      & (py[:, None] > cb[:, 1]) & (py[:, None] < cb[:, 3])).any(1)
            assert inside.all(), f"image {det.ids[i]}: class {c} pixels outside its boxes"
        # per object (instance PNG index k+1): its pixels are inside its box and the box is tight
        with Image.open(voc / "SegmentationObject" / f"{det.ids[i]}.png") as im:
            inst = torch.from_numpy(np.array(im).astype(np.int64))
        for k in range(len(boxes)):
            ys, xs = torch.nonzero(inst == k + 1, as_tuple=True)
            if diff[k] and len(ys) == 0:
                continue
            assert len(ys) > 0, f"image {det.ids[i]} object {k} has no pixels"
            assert (mask[ys, xs] == labels[k]).all()
            x1, y1, x2, y2 = boxes[k].tolist()
            assert x1 <= xs.min() and xs.max() + 1 <= x2 and y1 <= ys.min() and ys.max() + 1 <= y2
            # the box is the exact extent of the visible object, whose pixels are its own or void (255):
            # each box edge row/column touches such a pixel
            xa, ya, xb, yb = int(x1), int(y1), int(x2) - 1, int(y2) - 1
            own = (inst == k + 1) | (inst == 255)
            for edge in (own[ya, xa:xb + 1], own[yb, xa:xb + 1], own[ya:yb + 1, xa], own[ya:yb + 1, xb]):
                assert edge.any(), (det.ids[i], k)
            n_obj += 1
    assert n_void > 0 and n_obj >= 12


def test_determinism(tmp_path, demo_root):
    other = make_demo_voc(tmp_path / "again", **KW)
    for rel in ("Annotations/000003.xml", "JPEGImages/000003.jpg", "SegmentationClass/000003.png"):
        a = (demo_root / "VOCdevkit/VOC2007" / rel).read_bytes()
        b = (other / "VOCdevkit/VOC2007" / rel).read_bytes()
        assert a == b, rel
    diff_seed = make_demo_voc(tmp_path / "seed1", **{**KW, "seed": 1, "num_train": 2, "num_val": 1})
    assert (diff_seed / "VOCdevkit/VOC2007/Annotations/000001.xml").read_bytes() != \
        (demo_root / "VOCdevkit/VOC2007/Annotations/000001.xml").read_bytes()


def test_idempotent_and_repairs(tmp_path, monkeypatch):
    kw = dict(num_train=3, num_val=2, image_size=64, seed=3)
    root = make_demo_voc(tmp_path, **kw)
    voc = root / "VOCdevkit" / "VOC2007"
    assert demo_voc_is_complete(root, **kw) and (voc / ".complete").is_file()
    marker_mtime = (voc / ".complete").stat().st_mtime_ns

    calls = []
    real_generate = demo_voc._generate
    monkeypatch.setattr(demo_voc, "_generate", lambda *a: calls.append(1) or real_generate(*a))
    assert make_demo_voc(tmp_path, **kw) == root and ensure_demo_voc(tmp_path, **kw) == root
    assert calls == [] and (voc / ".complete").stat().st_mtime_ns == marker_mtime

    # a file went missing -> regenerated
    (voc / "JPEGImages" / "000002.jpg").unlink()
    assert not demo_voc_is_complete(root, **kw)
    with pytest.warns(UserWarning, match="regenerating"):
        make_demo_voc(tmp_path, **kw)
    assert calls == [1] and (voc / "JPEGImages" / "000002.jpg").is_file() and demo_voc_is_complete(root, **kw)

    # other parameters -> regenerated; overwrite=True -> regenerated
    with pytest.warns(UserWarning):
        make_demo_voc(tmp_path, **{**kw, "num_val": 1})
    assert len((voc / "ImageSets/Main/val.txt").read_text().split()) == 1
    make_demo_voc(tmp_path, **{**kw, "num_val": 1}, overwrite=True)
    assert len(calls) == 3
    assert not list((root / "VOCdevkit").glob(".VOC2007.*"))


def test_interrupted_run_leaves_nothing_complete(tmp_path, monkeypatch):
    def boom(out, p):
        (out / "JPEGImages").mkdir(parents=True)
        (out / "JPEGImages" / "000001.jpg").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_voc, "_generate", boom)
    with pytest.raises(KeyboardInterrupt):
        make_demo_voc(tmp_path, num_train=2, num_val=1, image_size=64)
    assert not (tmp_path / "VOCdevkit" / "VOC2007").exists()
    assert not list((tmp_path / "VOCdevkit").glob(".VOC2007.*"))
    monkeypatch.undo()
    root = ensure_demo_voc(tmp_path, num_train=2, num_val=1, image_size=64)
    assert demo_voc_is_complete(root)


def test_refuses_foreign_voc(tmp_path):
    foreign = tmp_path / "VOCdevkit" / "VOC2007" / "Annotations"
    foreign.mkdir(parents=True)
    (foreign / "real.xml").write_text("<annotation/>")
    with pytest.raises(FileExistsError, match="not a PCE demo dataset"):
        make_demo_voc(tmp_path, num_train=2, num_val=1, image_size=64)
    assert (foreign / "real.xml").is_file()


def test_varied_sizes(tmp_path):
    root = make_demo_voc(tmp_path, num_train=4, num_val=0, image_size=(64, 100), seed=5)
    ds = VOCDetection(root, year="2007", image_set="train", classes=DEMO_CLASSES)
    shapes = {tuple(ds[i][0].shape[-2:]) for i in range(len(ds))}
    assert all(64 <= h <= 100 and 64 <= w <= 100 for h, w in shapes) and len(shapes) > 1


def test_cli(tmp_path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run(
        [sys.executable, "tools/make_demo_data.py", "--root", str(tmp_path / "cli"), "--num-train", "3",
         "--num-val", "2", "--image-size", "64", "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "cli") in out.stdout and "train=3" in out.stdout and "val=2" in out.stdout
    assert demo_voc_is_complete(tmp_path / "cli", num_train=3, num_val=2, num_test=0, image_size=64, seed=1)
