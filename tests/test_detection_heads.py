"""The detection heads beside Faster R-CNN (pce.tasks.detection.heads): RetinaNet, FCOS and Mask R-CNN on a PCE
backbone + FPN, per-object masks from VOC's SegmentationObject through the transforms, COCO mask AP (segm) in the
evaluator, and the demo configs of each head trained for two iterations through tools/train.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import _default_anchorgen

from pce.datasets import DEMO_CLASSES, make_demo_voc
from pce.datasets.voc import VOCDetection
from pce.datasets.voc_transforms import DetectionTransform
from pce.engine import load_config
from pce.tasks.detection import (DETECTION_HEADS, DetectionEvaluator, PCEFCOS, PCEMaskRCNN, PCERetinaNet,
                                 build_detector)
from _faults_util import load_tool

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_classes=3, fpn_channels=32, min_size=64, max_size=80, backbone_overrides=dict(num_experts=2))
LOSSES = {"retinanet": {"classification", "bbox_regression"},
          "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
          "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}}


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 80, generator=g)]
    targets = []
    for (x0, y0, x1, y1), (h, w), lab in (((4, 4, 40, 40), (64, 64), 1), ((10, 8, 60, 50), (64, 80), 2)):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, y0:y1, x0:x1] = 1
        targets.append({"boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), "labels": torch.tensor([lab]),
                        "masks": masks})
    return images, targets


@pytest.mark.parametrize("arch,cls", [("retinanet", PCERetinaNet), ("fcos", PCEFCOS), ("mask_rcnn", PCEMaskRCNN)])
def test_heads_train_and_detect(arch, cls):
    model = build_detector("pce_tiny", arch=arch, **SMALL)
    assert isinstance(model, cls) and model.num_classes == 3 and arch in DETECTION_HEADS
    images, targets = _batch()
    losses = model.train()(images, targets)
    assert set(losses) == LOSSES[arch] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pce_backbone.stem.parameters())
    dets = model.eval()(images)
    assert len(dets) == 2 and {"boxes", "labels", "scores"} <= set(dets[0])
    assert ("masks" in dets[0]) == (arch == "mask_rcnn") == model.predicts_masks
    if arch == "mask_rcnn":
        assert dets[1]["masks"].shape[1:] == (1, 64, 80)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_one_stage_heads_never_detect_the_background(arch):
    """num_classes counts the background as for the R-CNNs: even with class 0 scoring highest everywhere, no
    detection has label 0 (the evaluator rejects it); the other classes are still detected."""
    model = build_detector("pce_tiny", arch=arch, score_thresh=0.0, **SMALL).eval()
    with torch.no_grad():
        head = model.head.classification_head
        head.cls_logits.bias[:] = torch.tensor([8.0, 2.0, 2.0]).repeat(head.num_anchors)  # [A * K], per anchor
    dets = model(_batch()[0])
    labels = torch.cat([d["labels"] for d in dets])
    assert len(labels) > 0 and (labels >= 1).all() and (labels <= 2).all()


def test_one_stage_heads_use_torchvision_levels_and_anchors():
    """RetinaNet / FCOS: the last 3 stages (strides 8, 16, 32) + P6, P7, with exactly torchvision's default anchors
    for those strides (its retinanet_resnet50_fpn / FCOS defaults)."""
    retina = build_detector("pce_tiny", arch="retinanet", **SMALL)
    assert [f["stride"] for f in retina.backbone.feature_info] == [8, 16, 32, 64, 128]
    assert [f["name"] for f in retina.backbone.feature_info] == ["0", "1", "2", "p6", "p7"]
    assert len(retina.pce_backbone.stages) == 4 and retina.pce_backbone.out_indices == (1, 2, 3)
    ref = _default_anchorgen()
    assert retina.anchor_generator.sizes == ref.sizes and retina.anchor_generator.aspect_ratios == ref.aspect_ratios
    fcos = build_detector("pce_tiny", arch="fcos", **SMALL)
    ref_fcos = FCOS(retina.backbone, num_classes=3).anchor_generator  # torchvision's default for FCOS
    assert fcos.anchor_generator.sizes == ref_fcos.sizes and fcos.anchor_generator.aspect_ratios == ref_fcos.aspect_ratios


def test_head_options_are_checked():
    with pytest.raises(KeyError, match="fcos.*mask_rcnn.*retinanet"):
        build_detector("pce_tiny", arch="yolo", **SMALL)
    with pytest.raises(TypeError, match="derives 'head'"):
        build_detector("pce_tiny", arch="retinanet", head=None, **SMALL)
    with pytest.raises(TypeError, match="unknown detector option.*box_score_thresh"):
        build_detector("pce_tiny", arch="fcos", box_score_thresh=0.1, **SMALL)     # a Faster R-CNN option
    model = build_detector("pce_tiny", arch="fcos", score_thresh=0.3, topk_candidates=50, **SMALL)
    assert model.score_thresh == 0.3 and model.topk_candidates == 50
    model = build_detector("pce_tiny", arch="mask_rcnn", mask_layers=(16, 8), mask_roi_output_size=7, **SMALL)
    assert model.roi_heads.mask_roi_pool.output_size == (7, 7) and model.roi_heads.mask_predictor.mask_fcn_logits.in_channels == 8


# ------------------------------------------------------------------------------------------ masks in the data
def _rect_target(rects, h, w):
    masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.arange(1, len(rects) + 1),
            "difficult": torch.zeros(len(rects), dtype=torch.bool), "masks": masks}


def _extent(mask):
    ys, xs = np.nonzero(np.asarray(mask))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transform_moves_masks_with_the_boxes(seed):
    """Resize, scale-jitter crop, flip and padding: every kept mask's extent (numpy) is its box (the transform's
    box path, arithmetic and albumentations), within the 1 px of nearest-neighbour resizing."""
    rects = [(4, 6, 30, 40), (40, 10, 90, 35), (60, 50, 95, 70)]
    target = _rect_target(rects, 80, 100)
    tf = DetectionTransform(train=True, min_size=120, max_size=200, hflip=1.0, scale_range=(1.4, 1.4),
                            color_jitter=None, size_divisibility=64, min_visibility=0.0, seed=seed)
    image, out = tf(torch.rand(3, 80, 100), target)
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (len(out["boxes"]), *image.shape[-2:])
    assert image.shape[-1] % 64 == 0 and len(out["boxes"]) >= 1
    for m, box, lab in zip(out["masks"], out["boxes"], out["labels"]):
        np.testing.assert_allclose(_extent(m), box.numpy(), atol=1.01)
    flipped = tf.__class__(train=False, min_size=None, max_size=None)(torch.rand(3, 80, 100), target)[1]
    assert torch.equal(flipped["masks"], target["masks"])   # eval at the original size: unchanged


def test_voc_detection_reads_instance_masks(tmp_path):
    """masks=True: object k of the XML is value k + 1 of SegmentationObject/{id}.png; void and background 0."""
    from PIL import Image

    root = make_demo_voc(tmp_path / "voc", num_train=3, num_val=1, image_size=48)
    ds = VOCDetection(root, "2007", "train", classes=DEMO_CLASSES, masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        inst = np.array(Image.open(ds.instance_mask_path(i)))
        assert target["masks"].shape == (len(target["labels"]), *image.shape[-2:])
        for k, m in enumerate(target["masks"].numpy()):
            assert np.array_equal(m, (inst == k + 1).astype(np.uint8)) and m.any()
    assert "masks" not in VOCDetection(root, "2007", "train", classes=DEMO_CLASSES)[0][1]
    # as in real VOC, the images with instance masks are those of ImageSets/Segmentation, not Main
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(f"{ds.ids[2]}\n")
    only = VOCDetection(root, "2007", "train", classes=DEMO_CLASSES, masks=True)
    assert only.ids == [ds.ids[2]] and len(VOCDetection(root, "2007", "train", classes=DEMO_CLASSES)) == 3
    inst = np.array(Image.open(ds.instance_mask_path(2)))
    inst[0, 0] = len(only[0][1]["labels"]) + 1                  # an instance the XML does not list
    Image.fromarray(inst).save(ds.instance_mask_path(2))
    with pytest.raises(ValueError, match=str(ds.instance_mask_path(2).name)):
        only[0]
    (ds.instance_mask_path(0)).unlink()
    with pytest.raises(FileNotFoundError, match="SegmentationObject"):
        ds[0]


# ------------------------------------------------------------------------------------------ mask AP
def _square(shift=0, size=(40, 40)):
    m = np.zeros(size, np.uint8)
    m[10:20, 10 + shift:20 + shift] = 1
    return m


def _mask_iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def _segm(pred_masks, scores, gt_masks):
    ev = DetectionEvaluator(["a"])
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])  # perfect boxes: box AP 1.0 whatever the masks
    for pm, s, gm in zip(pred_masks, scores, gt_masks):
        ev.update([{"boxes": box, "scores": torch.tensor([s]), "labels": torch.tensor([1]),
                    "masks": torch.from_numpy(pm[None])}],
                  [{"boxes": box, "labels": torch.tensor([1]), "masks": torch.from_numpy(gm[None])}])
    return ev.compute()


def test_segm_ap_perfect_and_shifted_masks():
    res = _segm([_square()], [0.9], [_square()])
    assert res["segm_mAP"] == pytest.approx(1.0) and res["segm_AP50"] == pytest.approx(1.0) and res["mAP"] == pytest.approx(1.0)
    assert _mask_iou(_square(4), _square()) == pytest.approx(0.4286, abs=1e-4)      # 60 / 140: below 0.5
    res = _segm([_square(4)], [0.9], [_square()])
    assert res["segm_AP50"] == 0.0 and res["segm_mAP"] == 0.0 and res["AP50"] == pytest.approx(1.0)


def test_segm_ap_matches_a_hand_computation():
    """Two images: a perfect mask (score 0.9) and one shifted to IoU 2/3 (score 0.8). At IoU thresholds 0.50 ..
    0.65 both match (AP 1); at 0.70 .. 0.95 only the first does: precision 1 up to recall 1/2, so COCO's
    101-point AP is 51 / 101. mAP = (4 * 1 + 6 * 51 / 101) / 10."""
    iou = _mask_iou(_square(2), _square())
    assert iou == pytest.approx(2 / 3)
    thresholds = np.linspace(0.5, 0.95, 10)
    per_thr = [1.0 if t <= iou else 51 / 101 for t in thresholds]
    res = _segm([_square(), _square(2)], [0.9, 0.8], [_square(), _square()])
    assert res["segm_mAP"] == pytest.approx(float(np.mean(per_thr))) == pytest.approx((4 + 6 * 51 / 101) / 10)
    assert res["segm_AP50"] == pytest.approx(1.0) and res["segm_AP75"] == pytest.approx(51 / 101)
    assert res["mAP"] == pytest.approx(1.0)                                          # boxes: all perfect
    ev = DetectionEvaluator(["a"])
    with pytest.raises(KeyError, match="no 'masks'"):
        ev.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, 8, 8)}], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])


# ------------------------------------------------------------------------------------------ demo configs
DEMO_HEADS = {"demo_det_retinanet_pce.py": ("retinanet", "AP50"), "demo_det_fcos_pce.py": ("fcos", "AP50"),
              "demo_inst_maskrcnn_pce.py": ("mask_rcnn", "segm_AP50")}


@pytest.mark.parametrize("name", sorted(DEMO_HEADS))
def test_demo_configs_and_dense_twins(name):
    arch, metric = DEMO_HEADS[name]
    cfg, dense = load_config(REPO / "configs" / name), load_config(REPO / "configs" / name.replace("_pce", "_dense"))
    assert cfg.task == "detection" and cfg.model.head.arch == arch and cfg.eval.metric == metric
    assert dense.model.backbone == "dense_tiny" and dict(dense.data) == dict(cfg.data) and len(dense.phases) == 1
    assert dict(dense.model.head) == dict(cfg.model.head)
    assert bool(cfg.data.train.kwargs.get("masks")) == bool(cfg.data.val.kwargs.get("masks")) == (arch == "mask_rcnn")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEMO_HEADS))
def test_demo_config_trains_two_iterations(tmp_path, capsys, name):
    arch, metric = DEMO_HEADS[name]
    wd, demo = tmp_path / "wd", dict(num_train=4, num_val=2, image_size=64, seed=0)
    size = ["min_size=64", "max_size=64"]
    opts = [f"data.root={str(tmp_path / 'voc')!r}", *[f"data.{s}.kwargs.demo={demo!r}" for s in ("train", "val")],
            *[f"data.{s}.transform.kwargs.{kv}" for s in ("train", "val") for kv in size],
            *[f"model.head.{kv}" for kv in size], "model.head.fpn_channels=32",  # FCOS: GroupNorm(32)
            "model.backbone_overrides.num_experts=2",  # K-Means on the deepest stage (1 patch) of 2 images
            "schedule.epochs=1", "schedule.max_iters=2", "phases=[{'name': 'route', 'epochs': -1}]",
            "runtime.kmeans_init_batches=1", "runtime.device='cpu'", "runtime.num_threads=1",
            "runtime.tensorboard=False", "runtime.progress_bar=False", "runtime.log_interval=1",
            "data.batch_size=2", "data.num_workers=0"]
    rc = load_tool("train").main([f"configs/{name}", "--work-dir", str(wd), "--cfg-options", *opts])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    losses = {k: v for r in train for k, v in r.items() if k.startswith("loss")}
    assert len(train) == 2 and set(losses) >= {"loss", "loss_router"} | {
        k if k.startswith("loss") else f"loss_{k}" for k in LOSSES.get(arch, ())}, train
    assert all(math.isfinite(v) for v in losses.values()), train
    evals = {k for r in rows if r["type"] == "val" for k in r}
    expected = {"mAP", "AP50", "AP75", "AP50_voc07"} | ({"segm_mAP", "segm_AP50", "segm_AP75"} if arch == "mask_rcnn"
                                                        else set())
    assert expected <= evals, sorted(evals)
    assert f"final val {metric}:" in out.out


def test_detection_task_with_masks():
    """The task adapter on Mask R-CNN: masks go into the losses, predictions carry binary masks the evaluator
    scores (segm_*), to_input_frame resizes them to the original image; targets without masks are a one-line
    error naming the data key."""
    from pce.tasks import get_task

    cfg = load_config(REPO / "configs" / "demo_inst_maskrcnn_pce.py", [
        "model.head.min_size=64", "model.head.max_size=80", "model.head.fpn_channels=16",
        "model.head.representation_size=32", "model.head.mask_layers=(8, 8)", "model.backbone_overrides.num_experts=2"])
    task = get_task("detection")
    model = task.build_model(cfg)
    images, targets = _batch()
    losses = task.train_step(model.train(), (images, targets), torch.device("cpu"))
    assert {"loss_mask", "loss_router"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    preds, tg = task.predict(model.eval(), (images, targets), torch.device("cpu"))
    assert preds[1]["masks"].dtype == torch.uint8 and preds[1]["masks"].shape[1:] == (64, 80)
    assert set(preds[1]["masks"].unique().tolist()) <= {0, 1}
    ev = task.build_evaluator(cfg)
    ev.update(preds, tg)
    assert {"segm_mAP", "segm_AP50", "mAP"} <= set(ev.compute())
    square = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": torch.ones(1), "labels": torch.ones(1),
              "masks": torch.zeros(1, 8, 8, dtype=torch.uint8)}
    square["masks"][0, :4, :4] = 1
    big = task.to_input_frame(square, (8, 8), (16, 24))
    assert big["masks"].shape == (1, 16, 24) and big["masks"].sum() == 8 * 12 and big["masks"][0, :8, :12].all()
    with pytest.raises(ValueError, match=r"data\.train.*masks=True"):
        task.train_step(model.train(), (images, [{k: v for k, v in t.items() if k != "masks"} for t in targets]),
                        torch.device("cpu"))


def test_render_draws_the_kept_masks():
    """Mask R-CNN outputs: each kept object's pixels take its class colour (as overlay_mask draws a label map), a
    mask scoring below score_thr leaves the image; without masks only the boxes are drawn."""
    from pce.tasks import get_task
    from pce.tasks.visualize import overlay_mask

    task, image = get_task("detection"), torch.zeros(3, 40, 40)
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 24:30, 4:10] = masks[1, 24:30, 24:30] = 1
    out = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 2), "labels": torch.tensor([1, 2]),
           "scores": torch.tensor([0.9, 0.1]), "masks": masks}
    drawn = task.render(image, out, score_thr=0.5, alpha=1.0)
    ref = overlay_mask(image, masks[0].long(), alpha=1.0)                   # class 1 where mask 0 is
    assert torch.equal(drawn[:, 24:30, 4:10], ref[:, 24:30, 4:10]) and ref[:, 24:30, 4:10].sum() > 0
    assert not drawn[:, 24:30, 24:30].any()                                 # score 0.1 < 0.5: not drawn
    boxes_only = task.render(image, {k: v for k, v in out.items() if k != "masks"}, score_thr=0.5)
    assert not boxes_only[:, 24:30, 4:10].any()
