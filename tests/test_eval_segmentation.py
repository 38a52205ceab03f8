"""Tests for pce.tasks.segmentation.evaluator."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from pce.tasks.segmentation.evaluator import SegmentationEvaluator

C = 5
IGNORE = 255


def random_batch(rng, b=3, h=17, w=23, c=C, p_ignore=0.1):
    target = rng.integers(0, c, size=(b, h, w))
    target[rng.random((b, h, w)) < p_ignore] = IGNORE
    pred = np.where(rng.random((b, h, w)) < 0.6, np.where(target == IGNORE, 0, target), rng.integers(0, c, size=(b, h, w)))
    return torch.from_numpy(pred).long(), torch.from_numpy(target).long()


def numpy_metrics(pred, target, c=C, ignore=IGNORE):
    """Independent numpy reference: per-class IoU via set counts over non-ignored pixels."""
    keep = target != ignore
    p, t = pred[keep], target[keep]
    ious, accs = [], []
    for k in range(c):
        inter = np.sum((p == k) & (t == k))
        union = np.sum((p == k) | (t == k))
        ious.append(inter / union if union else np.nan)
        accs.append(inter / np.sum(t == k) if np.sum(t == k) else np.nan)
    ious, accs = np.array(ious), np.array(accs)
    freq = np.array([np.sum(t == k) for k in range(c)]) / t.size
    fw = np.nansum(freq * np.nan_to_num(ious))
    return {"mIoU": np.nanmean(ious), "ious": ious, "mean_acc": np.nanmean(accs), "pixel_acc": np.mean(p == t), "fwIoU": fw}


def test_confusion_matches_sklearn_and_metrics_match_numpy():
    rng = np.random.default_rng(0)
    pred, target = random_batch(rng)
    ev = SegmentationEvaluator(C, ignore_index=IGNORE, class_names=list("abcde"))
    ev.update(pred, target)
    res = ev.compute()

    keep = target.numpy() != IGNORE
    expected_cm = confusion_matrix(target.numpy()[keep], pred.numpy()[keep], labels=list(range(C)))
    np.testing.assert_array_equal(ev.confusion.numpy(), expected_cm)
    assert res["confusion_matrix"] == expected_cm.tolist()
    assert ev.confusion.dtype == torch.int64

    ref = numpy_metrics(pred.numpy(), target.numpy())
    assert res["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-12)
    assert [res["per_class_IoU"][n] for n in "abcde"] == pytest.approx(ref["ious"].tolist(), abs=1e-12)
    assert res["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-12)
    assert res["mean_acc"] == pytest.approx(ref["mean_acc"], abs=1e-12)
    assert res["fwIoU"] == pytest.approx(ref["fwIoU"], abs=1e-12)
    assert res["num_pixels"] == int(keep.sum())
    assert 0.0 < res["mIoU"] < 1.0


def test_absent_class_excluded():
    # 4 classes; class 3 appears nowhere, class 2 is predicted but never in GT (IoU 0, counts)
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, IGNORE]]])
    pred = torch.tensor([[[0, 0, 1, 2], [0, 1, 1, 3]]])  # the 3 sits on an ignored pixel: not counted
    ev = SegmentationEvaluator(4, ignore_index=IGNORE)
    ev.update(pred, target)
    r = ev.compute()
    iou = r["per_class_IoU"]
    assert iou["0"] == pytest.approx(3 / 4)  # tp 3, gt 4, pred 3
    assert iou["1"] == pytest.approx(2 / 4)  # tp 2, gt 3, pred 3 -> union 4
    assert iou["2"] == 0.0  # predicted once, never in GT
    assert math.isnan(iou["3"])  # absent from both
    assert r["mIoU"] == pytest.approx((3 / 4 + 2 / 4 + 0.0) / 3)
    # accuracy undefined without GT pixels: classes 2 and 3 excluded from mean_acc
    assert math.isnan(r["per_class_acc"]["2"]) and math.isnan(r["per_class_acc"]["3"])
    assert r["mean_acc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    assert r["fwIoU"] == pytest.approx(4 / 7 * 3 / 4 + 3 / 7 * 2 / 4)
    assert "mean" in ev.format_table(r)


def test_logits_equal_argmax():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(2, C, 9, 11))).float()
    target = torch.from_numpy(rng.integers(0, C, size=(2, 9, 11)))
    target[0, :2] = IGNORE
    a, b = SegmentationEvaluator(C), SegmentationEvaluator(C)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.confusion, b.confusion)
    # unbatched input and numpy input
    c = SegmentationEvaluator(C)
    c.update(logits[0], target[0])
    c.update(logits[1].numpy(), target[1].numpy())
    assert torch.equal(c.confusion, a.confusion)


def test_accumulation_equals_single_update_and_merge():
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, b=2) for _ in range(4)]
    big = SegmentationEvaluator(C)
    big.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    acc = SegmentationEvaluator(C)
    for p, t in batches:
        acc.update(p, t)
    assert torch.equal(acc.confusion, big.confusion)
    # two "ranks" merged (what an all_reduce of .confusion does)
    r0, r1 = SegmentationEvaluator(C), SegmentationEvaluator(C)
    for i, (p, t) in enumerate(batches):
        (r0 if i % 2 else r1).update(p, t)
    r0.merge(r1.state_dict())
    assert torch.equal(r0.confusion, big.confusion)
    assert r0.compute()["mIoU"] == pytest.approx(big.compute()["mIoU"], abs=1e-15)
    big.reset()
    assert int(big.confusion.sum()) == 0
    assert math.isnan(big.compute()["mIoU"])


def test_bad_inputs():
    ev = SegmentationEvaluator(3, ignore_index=255)
    t = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="prediction value 3 out of range 0..2"):
        ev.update(torch.tensor([[[0, 3], [1, 1]]]), t)
    with pytest.raises(ValueError, match="prediction value -1"):
        ev.update(torch.tensor([[[0, -1], [1, 1]]]), t)
    with pytest.raises(ValueError, match="target value 7 out of range"):
        ev.update(t, torch.tensor([[[0, 7], [1, 255]]]))
    with pytest.raises(ValueError, match=r"pred labels shape \(1, 2, 3\) != target shape \(1, 2, 2\)"):
        ev.update(torch.zeros(1, 2, 3, dtype=torch.long), t)
    with pytest.raises(ValueError, match="4 channels"):
        ev.update(torch.zeros(1, 4, 2, 2), t)
    with pytest.raises(TypeError, match="float dtype"):
        ev.update(torch.zeros(1, 2, 2), t)
    with pytest.raises(TypeError, match="integer"):
        ev.update(t, t.float())
    assert int(ev.confusion.sum()) == 0
