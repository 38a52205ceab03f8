"""Routing statistics against hand computations on fixed routing tensors; routing maps' grids; patch labels."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pce
from pce.analysis import RoutingStats, box_patch_labels, class_patch_labels, mask_patch_labels, routing_maps
from pce.analysis import stats as S
from pce.analysis.labels import box_patch_labels, class_patch_labels, mask_patch_labels
from pce.moe.routing import RoutingResult

# 4 patches x 3 experts: patch 3 dropped, expert 2 never used
W = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
PROBS = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])


def test_statistics_equal_hand_computation():
    assert S.usage(W).tolist() == [0.5, 0.5, 0.0]                     # patches using expert e / 4
    assert S.usage_share(W).tolist() == [0.5, 0.5, 0.0]               # 2 + 2 + 0 assignments
    assert torch.allclose(S.mean_weight(W), torch.tensor([1.7, 1.3, 0.0]) / 4)
    assert S.dropped_rate(W) == 0.25
    hand = [math.log(2), -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), 0.0, math.log(3)]
    assert S.mean_entropy(PROBS) == pytest.approx(sum(hand) / 4, abs=1e-6)
    assert S.usage_entropy(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(math.log(2), abs=1e-6)
    assert S.imbalance(torch.tensor([3.0, 1.0, 2.0])) == 3.0 and S.imbalance(torch.tensor([2.0, 0.0])) == math.inf
    assert S.collapsed_experts(S.usage(W)) == [2]
    assert S.assigned_experts(W).tolist() == [0, 1, 0, -1]


def test_routing_stats_accumulates_like_the_functions():
    r = RoutingResult(weights=W.reshape(2, 2, 3), probs=PROBS.reshape(2, 2, 3), grid=(1, 2))
    st = RoutingStats(num_classes=2)
    st.update([("l", r)], labels={"l": torch.tensor([[0, 1], [1, 1]])})
    st.update([("l", r)])  # a batch without labels counts for usage, not for the class NMI
    s = st.compute()["l"]
    assert s["usage"] == [0.5, 0.5, 0.0] and s["dropped_rate"] == 0.25 and s["collapsed_experts"] == [2]
    assert s["num_patches"] == 8 and s["imbalance"] == math.inf
    assert s["expert_class"] == [[1, 1], [0, 1], [0, 0]]  # (expert, label) of patches 0, 1, 2; patch 3 dropped
    # expert 0 takes cell 0 of image 0 and cell 0 of image 1 (twice over two batches): share 1.0 of the images
    assert s["expert_position"] == [[[1.0, 0.0]], [[0.0, 0.5]], [[0.0, 0.0]]]
    assert s["expert_entropy"][0] == pytest.approx((math.log(2) + 0.0) / 2, abs=1e-6)


def test_nmi_of_positional_and_random_routing():
    B, P, E = 200, 4, 4
    pos = np.tile(np.arange(P), B)
    perfect = S.nmi_with_baseline(pos % E, pos)                     # expert = position
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["baseline"] < 0.01
    rng = np.random.default_rng(0)
    rand = S.nmi_with_baseline(rng.integers(0, E, B * P), pos)       # routing independent of position
    assert rand["nmi"] < 0.01 and abs(rand["nmi"] - rand["baseline"]) < 5 * rand["baseline_std"] + 1e-3
    labels = rng.integers(0, 10, B)
    cls = S.nmi_with_baseline(np.repeat(labels % E, P), np.repeat(labels, P))  # expert = class mod 4
    from sklearn.metrics import mutual_info_score

    e, y = np.repeat(labels % E, P), np.repeat(labels, P)
    h = lambda a: -sum(c / a.size * math.log(c / a.size) for c in np.bincount(a) if c)  # noqa: E731
    assert cls["nmi"] == pytest.approx(mutual_info_score(y, e) / ((h(e) + h(y)) / 2))
    # one expert (a shared phase) and one label (an all-background batch): no mutual information, not "identical
    # partitions" (scikit-learn's 1.0)
    for experts, labels in ((np.zeros(8, int), np.zeros(8, int)), (np.zeros(8, int), np.arange(8) % 2),
                            (np.arange(8) % 4, np.ones(8, int))):
        assert mutual_info_score(labels, experts) == 0.0
        assert S.nmi_with_baseline(experts, labels) == {"nmi": 0.0, "baseline": 0.0, "baseline_std": 0.0, "n": 8}


def test_routing_maps_have_each_layers_grid():
    torch.manual_seed(0)
    model = pce.build_backbone("pce_tiny", num_experts=4, top_k=1)
    x = torch.randn(2, 3, 128, 256)
    maps = routing_maps(model, x)
    assert model.training  # mode restored
    with pce.record_routing(model, detach=True) as rec:
        model.eval()(x)
    assert list(maps) == rec.names
    for info, (name, r), m in zip(model.feature_info, rec.records, maps.values()):
        gh, gw = 128 // info["stride"] // info["patch_size"], 256 // info["stride"] // info["patch_size"]
        assert m.grid == (gh, gw) and m.expert.shape == (2, gh, gw) and m.weights.shape == (2, gh, gw, 4)
        assert m.patch_size == info["patch_size"] * info["stride"] and m.feature_stride == info["stride"]
        assert torch.equal(m.expert.reshape(2, -1), r.weights.argmax(-1))
        assert torch.allclose(m.entropy.reshape(2, -1), pce.moe.metrics.entropy(r.probs))


def test_patch_labels():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, 2:] = 3
    mask[0, 2:, :2] = 255  # ignored: that patch has no label
    mask[0, 3, 3] = 1
    assert mask_patch_labels(mask, (2, 2), num_classes=4).tolist() == [[0, 3, -1, 0]]
    t = [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1, 2])}]
    # 2x2 grid on 8x8: centres (2,2) in both boxes -> the smaller (2); the others only in the big box
    assert box_patch_labels(t, (2, 2), image_sizes=[(8, 8)]).tolist() == [[2, 1, 1, 1]]
    assert class_patch_labels(torch.tensor([4, 7]), (1, 2)).tolist() == [[4, 4], [7, 7]]
