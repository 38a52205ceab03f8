"""Tests for pce.tasks.classification.metrics."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from pce.tasks.classification.metrics import ClassificationEvaluator, topk_accuracy


def brute_topk(logits, targets, k):
    """Target counted as hit when fewer than k classes have a strictly larger logit (no ties in the data)."""
    hits = 0
    for row, t in zip(logits, targets):
        rank = int(np.sum(row > row[t]))
        hits += rank < k
    return hits / len(targets)


def random_data(rng, n=200, c=10):
    logits = rng.normal(size=(n, c)).astype(np.float32)
    targets = rng.integers(0, c, size=n)
    logits[np.arange(n), targets] += 1.0  # better than chance
    return logits, targets


def test_topk_matches_brute_force():
    rng = np.random.default_rng(0)
    logits, targets = random_data(rng)
    res = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(targets), ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert res[f"top{k}"] == pytest.approx(brute_topk(logits, targets, k), abs=1e-12)
    assert res["top1"] == pytest.approx(np.mean(logits.argmax(1) == targets))
    assert 0 < res["top1"] < res["top2"] < res["top5"] < 1


def test_topk_clamps_k_and_accepts_numpy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    targets = np.array([1, 2, 0])
    res = topk_accuracy(logits, targets, ks=(1, 2, 5))
    assert res == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(1 / 3), "top5": 1.0}
    assert math.isnan(topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))["top1"])


def test_topk_bad_inputs():
    with pytest.raises(ValueError, match="target 3 out of range 0..2"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"targets must be \[B\] with B=2"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"logits must be \[B, C\]"):
        topk_accuracy(torch.zeros(2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ks must be positive"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(0,))


def test_evaluator_confusion_vs_sklearn_and_accumulation():
    rng = np.random.default_rng(1)
    c = 7
    logits, targets = random_data(rng, n=300, c=c)
    names = [f"cls{i}" for i in range(c)]
    ev = ClassificationEvaluator(c, class_names=names, topk=(1, 5))
    for s in range(0, 300, 64):  # several updates
        ev.update(torch.from_numpy(logits[s:s + 64]), torch.from_numpy(targets[s:s + 64]))
    r = ev.compute()
    pred = logits.argmax(1)
    expected = confusion_matrix(targets, pred, labels=list(range(c)))
    assert r["confusion_matrix"] == expected.tolist()
    assert r["num_samples"] == 300
    assert r["top1"] == pytest.approx(brute_topk(logits, targets, 1))
    assert r["top5"] == pytest.approx(brute_topk(logits, targets, 5))
    assert r["top1"] == pytest.approx(np.trace(expected) / 300)
    per_class = np.diag(expected) / expected.sum(1)
    assert [r["per_class_acc"][n] for n in names] == pytest.approx(per_class.tolist())
    assert r["mean_class_acc"] == pytest.approx(per_class.mean())

    # merge of two halves equals the whole
    a, b = ClassificationEvaluator(c, topk=(1, 5)), ClassificationEvaluator(c, topk=(1, 5))
    a.update(logits[:100], targets[:100])
    b.update(logits[100:], targets[100:])
    m = a.merge(b.state_dict()).compute()
    assert m["confusion_matrix"] == r["confusion_matrix"]
    assert m["top1"] == r["top1"] and m["top5"] == r["top5"]


def test_evaluator_empty_class_and_errors():
    ev = ClassificationEvaluator(3, topk=(1, 5))
    ev.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 0]))
    r = ev.compute()
    assert r["top1"] == 0.5 and r["top5"] == 1.0  # k=5 clamped to 3 classes
    assert r["per_class_acc"]["0"] == 0.5
    assert math.isnan(r["per_class_acc"]["1"]) and math.isnan(r["per_class_acc"]["2"])
    assert r["mean_class_acc"] == 0.5
    with pytest.raises(ValueError, match="expected num_classes=3"):
        ev.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cannot merge"):
        ev.merge(ClassificationEvaluator(4))
    ev.reset()
    assert ev.num_samples == 0 and math.isnan(ev.compute()["top1"])
