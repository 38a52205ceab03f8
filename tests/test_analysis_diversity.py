"""Expert diversity (issue #26): weight cosines against scikit-learn and hand-built experts, output similarity
against the experts run by hand on patches cut by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics.pairwise import cosine_similarity
from torch import nn

import pce
from pce.analysis.diversity import (diversity_summary, expert_diversity, pairwise_output_similarity,
                                    weight_cosine)
from pce.models.routed import upcycle_experts

C, H, N, E = 4, 8, 4, 3  # channels, map side, patch side (2 x 2 grid), experts


def _layer_model(expert: str = "residual") -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), pce.PCELayer(C, patch_size=N, num_experts=E, expert=expert,
                                                          execution="sparse", top_k=1))
    return model.eval()


def _hand_cosine_and_distance(y: np.ndarray):
    """``y [N, E, D]`` -> mean per-token cosine ``[E, E]`` and ``||Y_i - Y_j|| / max(||Y_i||, ||Y_j||)``."""
    n_tok, n_exp = y.shape[:2]
    cos = np.zeros((n_exp, n_exp))
    for t in range(n_tok):
        cos += cosine_similarity(y[t])
    norms = [np.linalg.norm(y[:, i]) for i in range(n_exp)]
    dist = np.array([[np.linalg.norm(y[:, i] - y[:, j]) / max(norms[i], norms[j]) for j in range(n_exp)]
                     for i in range(n_exp)])
    return cos / n_tok, dist


def test_weight_cosine_equals_sklearn_on_the_flattened_kernels():
    layer = pce.PCELayer(C, patch_size=N, num_experts=4, expert="residual")
    bank = layer.experts
    flat = np.stack([torch.cat([bank.conv1.weights[e].flatten(), bank.conv2.weights[e].flatten()]).detach().numpy()
                     for e in range(4)])
    np.testing.assert_allclose(weight_cosine(bank).numpy(), cosine_similarity(flat.astype(np.float64)), atol=1e-10)


def test_orthogonal_and_identical_kernels_by_hand():
    layer = pce.PCELayer(1, patch_size=N, num_experts=3, expert="conv_bn_relu")
    with torch.no_grad():
        for e, w in enumerate(layer.experts.conv.weights):
            w.zero_()
        layer.experts.conv.weights[0][0, 0, 0, 0] = 2.0      # a one-hot kernel ...
        layer.experts.conv.weights[1][0, 0, 1, 1] = -3.0     # ... another position: orthogonal
        layer.experts.conv.weights[2][0, 0, 0, 0] = 0.5      # the direction of expert 0
    cos = weight_cosine(layer.experts)
    assert cos[0, 1].item() == 0.0 and cos[1, 2].item() == 0.0
    assert cos[0, 2].item() == pytest.approx(1.0, abs=1e-12)


def test_pairwise_output_similarity_by_hand():
    a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]])           # two tokens
    y = torch.stack([a, -a, 2 * a, torch.zeros_like(a)], dim=1)      # [2, 4, 3]
    s = pairwise_output_similarity(y)
    cos, rel = s["cosine"], s["rel_l2"]
    assert cos[0, 1].item() == pytest.approx(-1.0) and cos[0, 2].item() == pytest.approx(1.0)
    assert cos[0, 3].item() == 0.0 and cos[3, 3].item() == 1.0       # zero vs non-zero: 0; two zeros: identical
    assert rel[0, 1].item() == pytest.approx(2.0)                     # ||a + a|| / ||a||
    assert rel[0, 2].item() == pytest.approx(0.5)                     # ||a - 2a|| / ||2a||
    assert rel[0, 3].item() == pytest.approx(1.0) and rel[3, 3].item() == 0.0


def test_output_similarity_of_a_pce_layer_equals_experts_run_by_hand():
    model = _layer_model()
    layer = model[1]
    with torch.no_grad():  # make the experts differ in their batch-norm statistics too
        for m in layer.experts.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
    x = [torch.randn(2, 3, H, H), torch.randn(1, 3, H, H)]
    div = expert_diversity(model, x)["1"]
    g = H // N
    ys = []
    with torch.no_grad():
        for xb in x:
            h = model[0](xb)
            b = h.shape[0]
            tokens = h.reshape(b, C, g, N, g, N).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, C, N, N)
            ys.append(torch.stack([layer.experts.forward_one(tokens, e).flatten(1) for e in range(E)], 1))
    cos, dist = _hand_cosine_and_distance(torch.cat(ys).double().numpy())
    assert div["tokens"] == 3 * g * g
    np.testing.assert_allclose(np.array(div["output_cosine"]), cos, atol=1e-6)
    np.testing.assert_allclose(np.array(div["output_rel_l2"]), dist, atol=1e-6)
    assert div["output_cosine_min"] == pytest.approx(cos[~np.eye(E, dtype=bool)].min(), abs=1e-6)
    assert div["weight_cosine_mean"] < 0.5 and div["output_rel_l2_mean"] > 0.05


def test_copies_after_upcycling_are_identical_and_perturbed_copies_are_not():
    model = _layer_model()
    upcycle_experts(model, 0)
    x = [torch.randn(2, 3, H, H)]
    row = expert_diversity(model, x)["1"]
    assert row["weight_cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert row["output_cosine_min"] == pytest.approx(1.0, abs=1e-9) and row["output_rel_l2_max"] < 1e-6
    summary = diversity_summary({"1": row})
    assert summary["expert_weight_cos_min"] == pytest.approx(1.0, abs=1e-9)
    assert summary["expert_output_rel_l2_min"] < 1e-6
    with torch.no_grad():
        model[1].experts.conv1.weights[2].add_(0.05 * torch.randn_like(model[1].experts.conv1.weights[2]))
    row = expert_diversity(model, x)["1"]
    assert row["weight_cosine_min"] < 0.999 and row["output_rel_l2_max"] > 1e-3
    assert np.array(row["output_rel_l2"])[0, 1] < 1e-6  # the untouched pair is still a pair of copies


def test_pce_conv2d_outputs_are_compared_per_output_pixel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    layer = pce.PCEConv2d.from_conv(conv, num_experts=2, top_k=1, noise=0.5).eval()
    x = torch.randn(2, 3, 9, 9)
    row = expert_diversity(layer, [x])[""]
    with torch.no_grad():
        ys = [F.conv2d(x, layer.experts.weight[e], layer.experts.bias[e], stride=2, padding=1) for e in range(2)]
    y = torch.stack([t.permute(0, 2, 3, 1).reshape(-1, 5) for t in ys], 1).double().numpy()  # [B * 5 * 5, 2, 5]
    cos, dist = _hand_cosine_and_distance(y)
    assert row["tokens"] == 2 * 5 * 5
    np.testing.assert_allclose(np.array(row["output_cosine"]), cos, atol=1e-6)
    np.testing.assert_allclose(np.array(row["output_rel_l2"]), dist, atol=1e-6)
    copies = pce.PCEConv2d.from_conv(conv, num_experts=2, top_k=1).eval()
    assert expert_diversity(copies, [x])[""]["output_cosine_min"] == pytest.approx(1.0, abs=1e-9)
