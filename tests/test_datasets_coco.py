"""COCO-format detection data (pce.datasets.coco): the demo VOC set rewritten as COCO JSON by this test's own
ElementTree reader and pycocotools' RLE encoder must come back as the VOC reader gives it (boxes, labels,
difficult) with the instance masks of SegmentationObject; bad files are one-line errors naming them; a detection
config trains on COCO JSON through the real Trainer."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pce.datasets import COCODetection, DEMO_CLASSES, VOCDetection, make_demo_voc

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _voc_to_coco(voc: Path, image_set: str) -> dict:
    """The VOC split as COCO JSON, written independently of the project's readers (ElementTree, pycocotools)."""
    cats = [{"id": 10 * (k + 1), "name": n} for k, n in enumerate(DEMO_CLASSES)]  # ids need not be 1..C
    cat_id = {c["name"]: c["id"] for c in cats}
    images, anns = [], []
    for img_id, stem in enumerate((voc / "ImageSets" / "Main" / f"{image_set}.txt").read_text().split(), start=1):
        root = ET.parse(voc / "Annotations" / f"{stem}.xml").getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        images.append({"id": img_id, "file_name": f"{stem}.jpg", "width": w, "height": h})
        inst = np.array(Image.open(voc / "SegmentationObject" / f"{stem}.png"))
        for k, obj in enumerate(root.findall("object")):
            b = [float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax")]
            rle = mask_utils.encode(np.asfortranarray((inst == k + 1).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat_id[obj.find("name").text],
                         "bbox": [b[0] - 1, b[1] - 1, b[2] - b[0] + 1, b[3] - b[1] + 1], "area": 1.0,
                         "iscrowd": int(obj.find("difficult").text), "segmentation": rle})
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = make_demo_voc(tmp_path_factory.mktemp("coco"), num_train=4, num_val=2, image_size=96)
    voc = root / "VOCdevkit" / "VOC2007"
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(_voc_to_coco(voc, split)))
    return root


def test_coco_items_equal_the_voc_reader(coco_root):
    coco = COCODetection(coco_root, "annotations/instances_train.json", img_dir="VOCdevkit/VOC2007/JPEGImages",
                         masks=True)
    voc = VOCDetection(coco_root, "2007", "train", classes=DEMO_CLASSES)
    assert coco.classes == tuple(DEMO_CLASSES) and coco.num_classes == voc.num_classes and len(coco) == len(voc) == 4
    inst_dir = coco_root / "VOCdevkit" / "VOC2007" / "SegmentationObject"
    for i in range(len(coco)):
        (xc, tc), (xv, tv) = coco[i], voc[i]
        assert torch.equal(xc, xv)
        assert torch.allclose(tc["boxes"], tv["boxes"]) and torch.equal(tc["labels"], tv["labels"])
        assert torch.equal(tc["difficult"], tv["difficult"])
        inst = np.array(Image.open(inst_dir / f"{voc.ids[i]}.png"))
        want = np.stack([(inst == k + 1) for k in range(len(tv["labels"]))]).astype(np.uint8)
        assert tc["masks"].dtype == torch.uint8 and np.array_equal(tc["masks"].numpy(), want)


def test_class_subset_and_empty_images(coco_root):
    ds = COCODetection(coco_root, coco_root / "annotations" / "instances_train.json",
                       img_dir="VOCdevkit/VOC2007/JPEGImages", classes=[DEMO_CLASSES[1]])
    voc = VOCDetection(coco_root, "2007", "train", classes=DEMO_CLASSES)
    for i in range(len(ds)):
        keep = voc[i][1]["labels"] == 2
        assert torch.allclose(ds[i][1]["boxes"], voc[i][1]["boxes"][keep])
        assert ds[i][1]["labels"].tolist() == [1] * int(keep.sum())
    kept = COCODetection(coco_root, "annotations/instances_train.json", img_dir="VOCdevkit/VOC2007/JPEGImages",
                         classes=[DEMO_CLASSES[1]], remove_empty=True)
    assert len(kept) == sum(bool((voc[i][1]["labels"] == 2).any()) for i in range(len(voc)))


def _write(root: Path, data: dict, name: str = "bad.json") -> Path:
    path = root / "annotations" / name
    path.write_text(json.dumps(data))
    return path


def test_bad_files_are_errors_naming_them(coco_root, tmp_path):
    good = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    kw = dict(img_dir="VOCdevkit/VOC2007/JPEGImages")
    with pytest.raises(FileNotFoundError, match="nothere.json: COCO annotation file not found"):
        COCODetection(coco_root, "annotations/nothere.json", **kw)
    (coco_root / "annotations" / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a readable JSON file"):
        COCODetection(coco_root, "annotations/broken.json", **kw)
    with pytest.raises(ValueError, match=r"no \['categories'\]"):
        COCODetection(coco_root, _write(coco_root, {"images": [], "annotations": []}), **kw)
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["bbox"] = [1, 2, float("nan"), 4]
    with pytest.raises(ValueError, match=r"bad.json: annotation 1 has bbox .*four finite numbers"):
        COCODetection(coco_root, _write(coco_root, bad), **kw)
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="annotation 1 names category_id 99"):
        COCODetection(coco_root, _write(coco_root, bad), **kw)
    with pytest.raises(ValueError, match=r"classes \['zebra'\] are not categories"):
        COCODetection(coco_root, "annotations/instances_train.json", classes=["zebra"], **kw)
    bad = json.loads(json.dumps(good))
    bad["images"][0]["width"] += 7
    with pytest.raises(ValueError, match=r"image 1 is 103x96 \(WxH\) in the JSON but .*000001.jpg is 96x96"):
        COCODetection(coco_root, _write(coco_root, bad), **kw)[0]
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["bbox"] = [500.0, 500.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="annotation 1 box .* lies outside the 96x96 image"):
        COCODetection(coco_root, _write(coco_root, bad), **kw)[0]
    bad = json.loads(json.dumps(good))
    bad["annotations"][0]["bbox"][2] = 0.0
    ds = COCODetection(coco_root, _write(coco_root, bad), **kw)
    with pytest.warns(UserWarning, match=r"annotation\(s\) \[1\] have a box of zero width"):
        n = len(ds[0][1]["boxes"])
    assert n == sum(a["image_id"] == 1 for a in good["annotations"]) - 1


CONFIG = """
task = "detection"
model = dict(backbone="pce_tiny", num_classes=5,
             head=dict(fpn_channels=32, representation_size=64, min_size=96, max_size=96, anchor_scale=4),
             input_shape=(3, 96, 96))
_tf = dict(name="voc_detection", kwargs=dict(min_size=96, max_size=96))
_img = "VOCdevkit/VOC2007/JPEGImages"
data = dict(root={root!r},
            train=dict(name="coco_detection", kwargs=dict(ann_file="annotations/instances_train.json", img_dir=_img),
                       transform=_tf),
            val=dict(name="coco_detection", kwargs=dict(ann_file="annotations/instances_val.json", img_dir=_img),
                     transform=_tf),
            batch_size=2, num_workers=0)
optimizer = dict(type="sgd", lr=0.01, momentum=0.9, grad_clip=5.0)
schedule = dict(epochs=1, max_iters=2, lr_scheduler=dict(type="constant"))
runtime = dict(work_dir={work!r}, device="cpu", kmeans_init_batches=1, tensorboard=False, progress_bar=False)
eval = dict(metric="AP50", mode="max")
"""


def test_detection_trains_on_coco_json(coco_root, tmp_path):
    from pce.engine import Trainer, load_config
    from pce.tasks import get_task

    path = tmp_path / "coco_det.py"
    path.write_text(CONFIG.format(root=str(coco_root), work=str(tmp_path / "work")))
    cfg = load_config(path)
    trainer = Trainer(cfg, get_task("detection"))
    final = trainer.train()["final"]
    assert final["num_images"] == 2 and math.isfinite(float(final["mAP"])) and 0.0 <= float(final["AP50"]) <= 1.0
    assert (tmp_path / "work" / "best.pth").is_file()
    # the ground truth scored as predictions through the task's evaluator: every box found, crowds ignored
    ds = trainer.datasets["val"]
    ev = get_task("detection").build_evaluator(cfg, ds)
    assert ev.class_names == list(DEMO_CLASSES)
    for i in range(len(ds)):
        t = ds[i][1]
        keep = ~t["difficult"]
        ev.update([{"boxes": t["boxes"][keep], "labels": t["labels"][keep], "scores": torch.ones(int(keep.sum()))}],
                  [t])
    assert ev.compute()["AP50"] == pytest.approx(1.0)


def test_crowd_regions_are_scored_as_pycocotools_scores_them():
    """A detection inside a COCO crowd box (IoU < 0.5, intersection over its own area 1) is ignored, not a false
    positive: the evaluator's AP equals pycocotools' own COCOeval on the same JSON (an independent computation)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pce.tasks.detection import DetectionEvaluator

    gt_boxes = [[10, 10, 40, 40], [50, 50, 100, 100]]  # xyxy: one object, one crowd region of people
    crowd = [False, True]
    dets = [([60, 60, 70, 70], 0.95), ([12, 12, 40, 40], 0.9), ([0, 80, 20, 100], 0.7)]  # inside crowd, hit, FP
    ev = DetectionEvaluator(["person"])
    ev.update([{"boxes": torch.tensor([d for d, _ in dets], dtype=torch.float32),
                "scores": torch.tensor([s for _, s in dets]), "labels": torch.ones(3, dtype=torch.int64)}],
              [{"boxes": torch.tensor(gt_boxes, dtype=torch.float32), "labels": torch.ones(2, dtype=torch.int64),
                "difficult": torch.tensor(crowd), "iscrowd": torch.tensor(crowd)}])
    got = ev.compute()
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 128, "height": 128}], "categories": [{"id": 1, "name": "person"}],
                  "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": xywh(b), "iscrowd": int(c),
                                   "area": float((b[2] - b[0]) * (b[3] - b[1]))}
                                  for k, (b, c) in enumerate(zip(gt_boxes, crowd))]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        res = gt.loadRes([{"image_id": 1, "category_id": 1, "bbox": xywh(b), "score": s} for b, s in dets])
        ref = COCOeval(gt, res, "bbox")
        ref.evaluate(), ref.accumulate(), ref.summarize()
    assert got["mAP"] == pytest.approx(ref.stats[0], abs=1e-6) and got["AP50"] == pytest.approx(ref.stats[1], abs=1e-6)
    assert got["AP50"] == pytest.approx(1.0)  # the best-scored box lies in the crowd: ignored, not a false positive


def test_duplicate_category_names_and_masks_without_polygons_are_errors(coco_root):
    good = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    kw = dict(img_dir="VOCdevkit/VOC2007/JPEGImages")
    bad = json.loads(json.dumps(good))
    bad["categories"].append({"id": 99, "name": bad["categories"][0]["name"]})
    with pytest.raises(ValueError, match=r"bad.json: categories 10 and 99 share the name"):
        COCODetection(coco_root, _write(coco_root, bad), **kw)
    bad = json.loads(json.dumps(good))
    first = bad["annotations"][0]
    del first["segmentation"]
    ds = COCODetection(coco_root, _write(coco_root, bad), masks=True, **kw)
    with pytest.raises(ValueError, match=r"annotation\(s\) \[1\] have no segmentation"):
        ds[0]
    assert "iscrowd" in COCODetection(coco_root, "annotations/instances_train.json", **kw)[0][1]
