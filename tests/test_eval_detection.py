"""Tests for pce.tasks.detection.evaluator (hand-computed AP values + pycocotools cross-check)."""

import math
import pickle

import numpy as np
import pytest
import torch

from pce.tasks.detection.ap_voc import box_iou_xyxy, voc_ap
from pce.tasks.detection.evaluator import DetectionEvaluator

A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 40.0, 40.0]
C = [50.0, 0.0, 70.0, 30.0]


def pred(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def tgt(boxes, labels, difficult=None, image_id=None):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(labels, dtype=torch.int64)}
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    if image_id is not None:
        t["image_id"] = image_id
    return t


def run(preds, tgts, names=("a", "b"), **kw):
    ev = DetectionEvaluator(list(names), **kw)
    ev.update(preds, tgts)
    return ev.compute()


def coco101(rec, prec):
    """Hand/reference COCO 101-point AP from cumulative recall/precision."""
    rec = np.asarray(rec, float)
    prec = np.asarray(prec, float)
    env = np.maximum.accumulate(prec[::-1])[::-1] if len(prec) else prec
    q = []
    for t in np.linspace(0, 1, 101):
        i = np.searchsorted(rec, t, side="left")
        q.append(env[i] if i < len(env) else 0.0)
    return float(np.mean(q))


# --------------------------------------------------------------------------- hand-computed cases


def test_box_iou_continuous():
    iou = box_iou_xyxy(np.array([A]), np.array([[5, 0, 15, 10], A, B]))
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0]])  # no +1 pixel convention


def test_perfect_predictions(capsys):
    preds = [pred([A, B], [0.9, 0.8], [1, 2]), pred([C], [0.7], [1])]
    tgts = [tgt([A, B], [1, 2]), tgt([C], [1])]
    r = run(preds, tgts)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    for key in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert r[key] == pytest.approx(1.0), key
    assert r["per_class_AP50"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert r["per_class_AP50_voc07"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert r["num_images"] == 2
    assert r["num_gt"] == {"a": 2, "b": 1}


def test_shifted_boxes_iou_two_thirds():
    # shift by 2 px in x: IoU = 8*10 / (12*10) = 2/3 -> passes 0.50, 0.55, 0.60, 0.65 only
    gts = [[0, 0, 10, 10], [30, 30, 40, 40]]
    shifted = [[2, 0, 12, 10], [32, 30, 42, 40]]
    assert box_iou_xyxy(np.array(shifted[:1]), np.array(gts[:1]))[0, 0] == pytest.approx(2 / 3)
    r = run([pred(shifted, [0.9, 0.8], [1, 1])], [tgt(gts, [1, 1])])
    assert r["AP50"] == pytest.approx(1.0)
    assert r["AP75"] == pytest.approx(0.0)
    assert r["mAP"] == pytest.approx(0.4)  # 4 of 10 thresholds
    assert r["AP50_voc07"] == pytest.approx(1.0)
    assert r["AP50_voc12"] == pytest.approx(1.0)


def test_duplicate_detection_is_false_positive():
    # GT A, B (class 1). dets: A .9 (TP), A .8 (duplicate -> FP), B .7 (TP)
    # recall    = 1/2, 1/2, 1      precision = 1, 1/2, 2/3
    r = run([pred([A, A, B], [0.9, 0.8, 0.7], [1, 1, 1])], [tgt([A, B], [1, 1])])
    # area: envelope 1 up to recall .5, 2/3 up to recall 1
    assert r["AP50_voc12"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 11-point: t=0..0.5 (6 points) -> 1, t=0.6..1 (5 points) -> 2/3
    assert r["AP50_voc07"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # COCO 101-point: r=0..0.50 (51 points) -> 1, r=0.51..1 (50 points) -> 2/3
    assert r["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert r["AP50"] == pytest.approx(coco101([0.5, 0.5, 1], [1, 0.5, 2 / 3]))
    assert math.isnan(r["per_class_AP50"]["b"])  # class without GT
    # no GT in class b: excluded from the means
    assert r["per_class_AP50"]["a"] == pytest.approx(r["AP50_voc12"])


def test_difficult_ground_truth_is_ignored():
    # image 0: class 1: normal GT A detected (.6), difficult GT B detected with higher score (.95)
    #          and a second detection on difficult B (.9): both ignored, not FP.
    #          difficult GT C of class 1 is never detected -> not a missed positive.
    # image 1: class 2 has only a difficult GT, detected (.99) -> class 2 has no positive: excluded.
    preds = [pred([A, B, B], [0.6, 0.95, 0.9], [1, 1, 1]), pred([C], [0.99], [2])]
    tgts = [tgt([A, B, C], [1, 1, 1], difficult=[False, True, True]), tgt([C], [2], difficult=[True])]
    r = run(preds, tgts)
    for key in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert r[key] == pytest.approx(1.0), key
    assert math.isnan(r["per_class_AP50"]["b"])
    assert math.isnan(r["per_class_AP50_voc07"]["b"])
    assert math.isnan(r["per_class_AP"]["b"])
    assert r["num_gt"] == {"a": 1, "b": 0}

    # use_difficult=True: difficult boxes become positives.
    # class 1: dets B .95 (TP), B .9 (dup FP), A .6 (TP); 3 positives (C missed)
    #   recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    # class 2: 1 positive, detected -> AP 1
    r2 = run(preds, tgts, use_difficult=True)
    ap_a12 = 1 / 3 * 1 + 1 / 3 * 2 / 3
    ap_a07 = (4 * 1 + 3 * 2 / 3) / 11  # t=0..0.3 -> 1; t=0.4..0.6 -> 2/3; t=0.7..1 -> 0
    assert r2["per_class_AP50"]["a"] == pytest.approx(ap_a12)
    assert r2["per_class_AP50_voc07"]["a"] == pytest.approx(ap_a07)
    assert r2["per_class_AP50"]["b"] == pytest.approx(1.0)
    assert r2["AP50_voc12"] == pytest.approx((ap_a12 + 1) / 2)
    assert r2["AP50"] == pytest.approx((coco101([1 / 3, 1 / 3, 2 / 3], [1, 0.5, 2 / 3]) + 1) / 2)


def test_no_positive_anywhere_gives_nan():
    r = run([pred([A], [0.9], [1])], [tgt(np.zeros((0, 4)), [])])
    for key in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert math.isnan(r[key]), key


def test_empty_predictions_give_zero():
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}
    r = run([empty, dict(empty)], [tgt([A, B], [1, 2]), tgt([C], [1])])
    for key in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert r[key] == 0.0, key
    assert r["per_class_AP50"] == {"a": 0.0, "b": 0.0}
    assert r["per_class_AP"] == {"a": 0.0, "b": 0.0}


def test_false_positive_on_image_without_objects():
    # image 0: GT A detected with .8 (TP); image 1: no objects, a class-1 det with .9 (FP)
    # sorted: FP, TP -> recall 0, 1; precision 0, 1/2 -> every AP = 1/2
    preds = [pred([A], [0.8], [1]), pred([B], [0.9], [1])]
    tgts = [tgt([A], [1]), tgt(np.zeros((0, 4)), [])]
    r = run(preds, tgts)
    for key in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert r[key] == pytest.approx(0.5), key
    # without the empty image: perfect
    r1 = run(preds[:1], tgts[:1])
    assert r1["AP50_voc12"] == pytest.approx(1.0)
    assert r1["mAP"] == pytest.approx(1.0)
    # lower-scored FP on the empty image (after the TP) does not change AP at recall 1 <- precision
    r2 = run([pred([A], [0.8], [1]), pred([B], [0.1], [1])], tgts)
    assert r2["AP50_voc12"] == pytest.approx(1.0)


def test_eleven_point_and_area_definitions_differ():
    # 3 positives (A, B, C), dets: A .9 TP, far box .8 FP, B .7 TP; C missed
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    far = [100, 100, 110, 110]
    r = run([pred([A, far, B], [0.9, 0.8, 0.7], [1, 1, 1])], [tgt([A, B, C], [1, 1, 1])], names=["a"])
    assert r["AP50_voc12"] == pytest.approx(5 / 9)  # 1/3*1 + 1/3*2/3
    assert r["AP50_voc07"] == pytest.approx(6 / 11)  # (4*1 + 3*2/3 + 4*0) / 11
    assert r["AP50_voc07"] != pytest.approx(r["AP50_voc12"])


def test_voc_ap_eleven_point_threshold_exact():
    # recall exactly 0.3 must reach threshold t=0.3 (np.arange(0, 1.1, .1)[3] = 0.30000000000000004 would not)
    assert voc_ap([0.3], [1.0], use_07_metric=True) == pytest.approx(4 / 11)
    assert voc_ap([0.3], [1.0]) == pytest.approx(0.3)


def test_label_and_shape_errors():
    ev = DetectionEvaluator(["a", "b"])
    with pytest.raises(ValueError, match="label 3 out of range 1..2"):
        ev.update([pred([A], [0.9], [3])], [tgt([A], [1])])
    with pytest.raises(ValueError, match="label 0 out of range"):
        ev.update([pred([A], [0.9], [1])], [tgt([A], [0])])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        ev.update([{"boxes": torch.zeros(2, 5), "scores": torch.zeros(2), "labels": torch.ones(2, dtype=torch.long)}],
                  [tgt([A], [1])])
    with pytest.raises(ValueError, match="differ in length"):
        ev.update([pred([A, B], [0.9], [1, 1])], [tgt([A], [1])])
    with pytest.raises(ValueError, match="x2 < x1"):
        ev.update([pred([[10, 0, 5, 10]], [0.9], [1])], [tgt([A], [1])])
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        ev.update([pred([A], [0.9], [1])] * 2, [tgt([A], [1])])
    with pytest.raises(ValueError, match="difficult has 2 entries for 1 boxes"):
        ev.update([pred([A], [0.9], [1])], [tgt([A], [1], difficult=[False, True])])
    assert ev.num_images == 0


def test_accumulation_merge_and_state_dict():
    rng = np.random.default_rng(1)
    preds, tgts = random_dataset(rng, n_images=12, n_classes=3)
    for t, i in zip(tgts, range(len(tgts))):
        t["image_id"] = i
    full = DetectionEvaluator(["a", "b", "c"])
    full.update(preds, tgts)
    expected = full.compute()

    batched = DetectionEvaluator(["a", "b", "c"])
    for s in range(0, 12, 5):
        batched.update(preds[s:s + 5], tgts[s:s + 5])
    assert_same_results(batched.compute(), expected)

    # two "ranks" with the padding duplicate of DistributedSampler (image 0 seen twice)
    r0, r1 = DetectionEvaluator(["a", "b", "c"]), DetectionEvaluator(["a", "b", "c"])
    r0.update(preds[0::2], tgts[0::2])
    r1.update(preds[1::2] + preds[:1], tgts[1::2] + tgts[:1])
    state = pickle.loads(pickle.dumps(r1.state_dict()))  # what all_gather_object would ship
    merged = r0.merge(state)
    merged.synchronize()  # no process group: no-op
    assert merged.num_images == 12
    got = merged.compute()
    for k in ("mAP", "AP50", "AP75", "AP50_voc07", "AP50_voc12"):
        assert got[k] == pytest.approx(expected[k], abs=1e-12), k

    with pytest.raises(ValueError, match="class_names differ"):
        merged.merge(DetectionEvaluator(["x", "y", "z"]))
    merged.reset()
    assert merged.num_images == 0
    table = full.format_table(expected)
    assert "class" in table and "mean" in table and len(table.splitlines()) == 3 + 3 + 2


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys()
            for n in a[k]:
                assert a[k][n] == pytest.approx(b[k][n], abs=1e-12, nan_ok=True), (k, n)
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-12, nan_ok=True), k


# --------------------------------------------------------------------------- random cross-check


def random_dataset(rng, n_images, n_classes, max_gt=6, max_det=12):
    preds, tgts = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, max_gt + 1))
        xy = rng.uniform(0, 80, size=(m, 2))
        wh = rng.uniform(5, 30, size=(m, 2))
        gt = np.concatenate([xy, xy + wh], axis=1)
        gl = rng.integers(1, n_classes + 1, size=m)
        # detections: jittered copies of GTs (some duplicates, some wrong class) plus random boxes
        n_j = int(rng.integers(m // 2, max_det // 2 + m // 2 + 1)) if m else 0
        src = rng.integers(0, max(m, 1), size=n_j)
        size = np.tile(wh[src], 2) if m else np.zeros((0, 4))
        jit = gt[src] + rng.normal(0, 0.08, size=(n_j, 4)) * size if m else np.zeros((0, 4))
        jl = gl[src].copy() if m else np.zeros(0, dtype=np.int64)
        flip = rng.random(n_j) < 0.15
        jl[flip] = rng.integers(1, n_classes + 1, size=int(flip.sum()))
        n_r = int(rng.integers(0, max_det // 2 + 1))
        rxy = rng.uniform(0, 80, size=(n_r, 2))
        rnd = np.concatenate([rxy, rxy + rng.uniform(5, 30, size=(n_r, 2))], axis=1)
        boxes = np.concatenate([jit, rnd])
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        labels = np.concatenate([jl, rng.integers(1, n_classes + 1, size=n_r)]).astype(np.int64)
        # jittered copies tend to score higher than random boxes, with overlap between the two
        scores = np.concatenate([0.3 + 0.7 * rng.random(n_j), 0.8 * rng.random(n_r)])
        preds.append({"boxes": boxes, "scores": scores, "labels": labels})
        tgts.append({"boxes": gt, "labels": gl.astype(np.int64)})
    return preds, tgts


def _iou_pair(d, g):
    """Scalar IoU, written independently of the evaluator (continuous coordinates)."""
    w = min(d[2], g[2]) - max(d[0], g[0])
    h = min(d[3], g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((d[2] - d[0]) * (d[3] - d[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)


def reference_coco_ap(preds, tgts, cls, thr):
    """COCO-style: per image, dets by score grab the best *unmatched* GT with IoU >= thr; 101 points."""
    records, npos = [], 0
    for p, t in zip(preds, tgts):
        gts = [g for g, l in zip(t["boxes"], t["labels"]) if l == cls]
        npos += len(gts)
        dets = sorted([(s, b) for b, s, l in zip(p["boxes"], p["scores"], p["labels"]) if l == cls],
                      key=lambda x: -x[0])
        used = [False] * len(gts)
        for s, b in dets:
            best, best_iou = -1, thr
            for j, g in enumerate(gts):
                if used[j]:
                    continue
                v = _iou_pair(b, g)
                if v >= best_iou:
                    best, best_iou = j, v
            if best >= 0:
                used[best] = True
            records.append((s, best >= 0))
    if npos == 0:
        return None
    records.sort(key=lambda x: -x[0])
    tp = np.cumsum([r[1] for r in records])
    fp = np.cumsum([not r[1] for r in records])
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, 1)
    return coco101(rec, prec)


def reference_voc_area_ap(preds, tgts, cls):
    """VOC-style: dets by score globally; best-IoU GT overall; already matched -> FP; all-point area."""
    dets, gts_per_img, npos = [], {}, 0
    for i, (p, t) in enumerate(zip(preds, tgts)):
        gts_per_img[i] = [g for g, l in zip(t["boxes"], t["labels"]) if l == cls]
        npos += len(gts_per_img[i])
        dets += [(s, i, b) for b, s, l in zip(p["boxes"], p["scores"], p["labels"]) if l == cls]
    if npos == 0:
        return None
    dets.sort(key=lambda x: -x[0])
    used = {i: [False] * len(g) for i, g in gts_per_img.items()}
    tps = []
    for s, i, b in dets:
        ious = [_iou_pair(b, g) for g in gts_per_img[i]]
        j = int(np.argmax(ious)) if ious else -1
        if j >= 0 and ious[j] >= 0.5 and not used[i][j]:
            used[i][j] = True
            tps.append(1)
        else:
            tps.append(0)
    # all-point area: sum over each new TP of (delta recall) * (max precision at recall >= current)
    tp = np.cumsum(tps)
    prec = tp / np.arange(1, len(tps) + 1)
    ap = 0.0
    for k in range(len(tps)):
        if tps[k]:
            ap += (1.0 / npos) * prec[k:].max()
    return ap


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_against_reference_implementations(seed):
    rng = np.random.default_rng(seed)
    n_classes = 3
    preds, tgts = random_dataset(rng, n_images=25, n_classes=n_classes)
    ev = DetectionEvaluator(["a", "b", "c"])
    # feed half as torch tensors, half as numpy arrays
    half = len(preds) // 2
    ev.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds[:half]],
              [{k: torch.as_tensor(v) for k, v in t.items()} for t in tgts[:half]])
    ev.update(preds[half:], tgts[half:])
    r = ev.compute()
    thresholds = np.linspace(0.5, 0.95, 10)
    per_thr = []
    for thr in thresholds:
        aps = [reference_coco_ap(preds, tgts, c, thr) for c in range(1, n_classes + 1)]
        per_thr.append(np.mean([a for a in aps if a is not None]))
    assert r["AP50"] == pytest.approx(per_thr[0], abs=1e-6)
    assert r["AP75"] == pytest.approx(per_thr[5], abs=1e-6)
    assert r["mAP"] == pytest.approx(float(np.mean(per_thr)), abs=1e-6)
    assert 0.0 < r["AP50"] < 1.0  # the random case is not degenerate

    voc = [reference_voc_area_ap(preds, tgts, c) for c in range(1, n_classes + 1)]
    for name, v in zip(["a", "b", "c"], voc):
        assert r["per_class_AP50"][name] == pytest.approx(v, abs=1e-12)
    assert r["AP50_voc12"] == pytest.approx(float(np.mean(voc)), abs=1e-12)
