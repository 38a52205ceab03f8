import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pce.moe.losses import RouterLossWeights, router_loss
from pce.registry import ROUTERS
from pce.moe.routers import build_router
from pce.moe.routers.threshold import adaptive_threshold, hard_threshold_mask, soft_threshold_mask
from pce.moe.routing import capacity_mask
from pce.layers.positional import patch_centers
from pce.moe.losses import routing_aux_losses
from pce.models.presets import build_backbone as pce_build
from pce.analysis import stats as S

B, P, C, N, E = 2, 4, 6, 4, 4


def _inputs():
    return torch.randn(B, P, C, N, N), patch_centers(2, 2)


@pytest.mark.parametrize("name", ROUTERS.names())
@pytest.mark.parametrize("training", [True, False])
def test_every_router_gives_valid_weights(name, training):
    r = build_router(name, C, E)
    r.train(training)
    res = r(*_inputs())
    assert res.weights.shape == (B, P, E) and res.probs.shape == (B, P, E)
    assert (res.weights >= 0).all()
    assert (res.weights.sum(-1) <= 1 + 1e-5).all()
    assert set(routing_aux_losses(res)) >= {"entropy", "balance", "z", "collapse"}
    assert S.usage(res.weights).shape == (E,)


def test_adaptive_threshold_matches_hand_computation():
    w = torch.tensor([[0.5, 0.3, 0.2]])
    H = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    gap = (0.5 - (0.3 + 0.2) / 2) / (0.5 + 1e-8)  # k = min(4, E - 1) = 2
    expected = 1.0 * (1 - 0.5) + 2.0 * H / math.log(3) + 3.0 * gap
    theta = adaptive_threshold(w, lambdas=(1.0, 2.0, 3.0))
    assert theta.shape == (1, 1)
    assert theta.item() == pytest.approx(expected, rel=1e-6)
    # k = 4 with E = 6 uses the 2nd..5th largest
    w6 = torch.tensor([[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]])
    gap6 = (0.4 - (0.2 + 0.15 + 0.1 + 0.1) / 4) / 0.4
    assert adaptive_threshold(w6, lambdas=(0.0, 0.0, 1.0)).item() == pytest.approx(gap6, rel=1e-6)
    masked = soft_threshold_mask(w, torch.tensor([[0.25]]), beta=10.0)
    assert torch.allclose(masked, w * torch.sigmoid(10 * (w - 0.25)))
    hard = hard_threshold_mask(w, torch.tensor([[0.6]]))
    assert torch.equal(hard, torch.tensor([[0.5, 0.0, 0.0]]))  # the top weight always survives


def test_keys_get_gradient_only_when_trainable():
    r = build_router("cosine", C, E, ema_update=False)
    r.train()
    r(*_inputs()).weights.sum().backward()
    assert r.keys.grad is None and r.proj.weight.grad is not None
    r.set_keys_trainable(True)
    r.zero_grad()
    r(*_inputs()).weights.pow(2).sum().backward()
    assert r.keys.grad is not None and r.keys.grad.abs().sum() > 0


def test_ema_moves_keys_towards_assigned_embeddings():
    r = build_router("cosine", C, E, ema_decay=0.5)
    emb = torch.randn(1, 8, r.embed_dim)
    w = torch.zeros(1, 8, E)
    w[0, :, 1] = 1.0  # everything assigned to expert 1
    old = r.keys.detach().clone()
    target = F.normalize(F.normalize(emb[0], dim=-1).mean(0), dim=0)
    r.ema_step(emb, w)
    new = r.keys.detach()
    assert torch.dot(new[1], target) > torch.dot(old[1], target)
    assert torch.equal(new[0], old[0])  # experts with no mass do not move
    assert torch.allclose(new.norm(dim=-1), torch.ones(E), atol=1e-6)
    expected = F.normalize(0.5 * old[1] + 0.5 * F.normalize(emb[0], dim=-1).mean(0), dim=0)
    assert torch.allclose(new[1], expected, atol=1e-6)


def test_ema_runs_in_training_only_while_keys_frozen():
    r = build_router("cosine", C, E)
    before = r.keys.detach().clone()
    r.eval()
    r(*_inputs())
    assert torch.equal(r.keys, before)
    r.train()
    r(*_inputs())
    assert not torch.equal(r.keys, before)


def test_kmeans_init_gives_distinct_unit_keys():
    r = build_router("cosine", C, E)
    # four well-separated clusters of embeddings
    centres = F.normalize(torch.randn(E, r.embed_dim), dim=-1) * 5
    data = torch.cat([c + 0.05 * torch.randn(50, r.embed_dim) for c in centres])
    keys = r.init_keys(data)
    assert keys.shape == (E, r.embed_dim)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(E), atol=1e-5)
    assert torch.unique(keys.round(decimals=4), dim=0).shape[0] == E
    # each true cluster centre is matched by one key
    sims = F.normalize(centres, dim=-1) @ keys.t()
    assert (sims.max(dim=1).values > 0.99).all()
    with pytest.raises(ValueError, match="at least num_experts"):
        r.init_keys(torch.randn(2, r.embed_dim))


def test_capacity_drops_lowest_probability_tokens_first():
    assigned = torch.tensor([[True, False]] * 6)
    prio = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3], [0.51, 0.49]])
    keep = capacity_mask(assigned, prio, capacity=3)
    assert keep[:, 0].tolist() == [True, False, True, False, True, False]
    assert not keep[:, 1].any()


def test_gate_capacity_through_router():
    r = build_router("gate", C, 2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():  # make the gate prefer expert 0 for every patch, with distinct confidences
        r.scorer.mlp[-1].weight.zero_()
        r.scorer.mlp[-1].bias.copy_(torch.tensor([1.0, 0.0]))
    patches, pos = torch.randn(1, 6, C, N, N), patch_centers(2, 3)
    res = r(patches, pos)
    # capacity = ceil(1.0 * 6 tokens * 1 / 2 experts) = 3 of the 6 tokens routed to expert 0
    assert (res.weights[..., 0] > 0).sum() == 3
    assert S.dropped_rate(res.weights) == pytest.approx(0.5)
    kept_probs = res.probs[0, :, 0][res.weights[0, :, 0] > 0]
    dropped_probs = res.probs[0, :, 0][res.weights[0, :, 0] == 0]
    assert kept_probs.min() >= dropped_probs.max()


@pytest.mark.parametrize("name", ["cosine", "gate", "gumbel", "positional"])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_keeps_exactly_k(name, k):
    kw = {"capacity_factor": None} if name == "gate" else {}
    r = build_router(name, C, E, top_k=k, **kw)
    if name == "gumbel":
        r.hard = False
    res = r(*_inputs())
    assert ((res.weights > 0).sum(-1) == k).all()
    assert r.is_sparse


@pytest.mark.parametrize("name,k", [("cosine", 1), ("cosine", 2), ("gate", 1), ("expert_choice", None)])
def test_renormalize_straight_through_values_and_gradients(name, k):
    """Values of renormalize=True (kept weights sum to 1), gradients of renormalize=False (the raw weights)."""
    kw = {} if k is None else {"top_k": k}
    torch.manual_seed(0)
    raw = build_router(name, C, E, renormalize=False, **kw)
    unit = copy.deepcopy(raw)
    unit.renormalize = True
    st = copy.deepcopy(raw)
    st.renormalize = "straight_through"
    x, pos = _inputs()
    res = {}
    for key, r in (("raw", raw), ("unit", unit), ("st", st)):
        torch.manual_seed(1)
        res[key] = r(x, pos).weights
    torch.testing.assert_close(res["st"], res["unit"])
    kept = res["st"].sum(-1) > 0
    torch.testing.assert_close(res["st"].sum(-1)[kept], torch.ones(int(kept.sum())))
    g = torch.randn(res["raw"].shape)
    grads = {}
    for key, r in (("raw", raw), ("st", st)):
        r.zero_grad()
        (res[key] * g).sum().backward()
        grads[key] = [p.grad.clone() for p in r.parameters() if p.grad is not None]
    assert grads["raw"] and all(torch.allclose(a, b) for a, b in zip(grads["raw"], grads["st"]))
    with pytest.raises(ValueError, match="renormalize"):
        build_router(name, C, E, renormalize="yes", **kw)


def test_expert_choice_balances_by_construction():
    r = build_router("expert_choice", C, E, capacity_factor=1.0)
    res = r(*_inputs())
    assert ((res.weights > 0).sum(dim=(0, 1)) == B * P // E).all()
    two = build_router("expert_choice", C, E, top_k=2)(*_inputs())
    assert ((two.weights > 0).sum(dim=(0, 1)) == 2 * B * P // E).all()
    with pytest.raises(ValueError, match="not both"):
        build_router("expert_choice", C, E, top_k=1, capacity_factor=1.0)


def test_positional_is_deterministic_and_covers_experts():
    r = build_router("positional", C, E, noise_std=1.0)
    pos = patch_centers(4, 4)
    assert sorted(r.assignment(pos).unique().tolist()) == list(range(E))
    r.eval()
    a, b = r(torch.randn(1, 16, C, N, N), pos), r(torch.randn(1, 16, C, N, N), pos)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.weights.argmax(-1)[0], r.assignment(pos))
    r.train()
    assert not torch.equal(r(torch.randn(1, 16, C, N, N), pos).weights, a.weights)


def test_uniform_and_random_subset():
    r = build_router("uniform", C, E, subset=2)
    r.eval()
    assert torch.allclose(r(*_inputs()).weights, torch.full((B, P, E), 0.25))
    r.train()
    w = r(*_inputs()).weights
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(B, P))


def test_gumbel_hard_samples_one_hot():
    r = build_router("gumbel", C, E, hard=True)
    r.train()
    w = r(*_inputs()).weights
    assert ((w > 0).sum(-1) == 1).all() and torch.allclose(w.sum(-1), torch.ones(B, P))


def test_router_losses_match_formulas():
    from pce.moe.routing import Router

    class Fixed(Router):
        def score(self, patches, positions):
            return torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]]))

    res = Fixed(3)(torch.zeros(1, 2, 1, 1, 1), torch.zeros(2, 2))
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    f = torch.tensor([0.5, 0.5, 0.0])
    assert routing_aux_losses(res)["balance"].item() == pytest.approx(3 * (f * p.mean(0)).sum().item(), rel=1e-5)
    H = -(p * p.log()).sum(-1).mean()
    assert routing_aux_losses(res)["entropy"].item() == pytest.approx(H.item(), rel=1e-5)
    assert routing_aux_losses(res)["z"].item() == pytest.approx(0.0, abs=1e-6)  # logsumexp of log-probs = 0
    total = router_loss([res, res], RouterLossWeights(entropy=1.0, balance=0.5, z=0.0, collapse=0.0))
    assert total.item() == pytest.approx(H.item() + 0.5 * routing_aux_losses(res)["balance"].item(), rel=1e-5)
    with pytest.raises(KeyError, match="unknown router loss"):
        router_loss([res], {"confidence": 1.0})


def test_collapse_metric_and_surrogate():
    from pce.moe.routing import Router

    class AllToZero(Router):
        def score(self, patches, positions):
            return torch.tensor([[[10.0, -10.0, -10.0]] * 4])

    res = AllToZero(3, top_k=1)(torch.zeros(1, 4, 1, 1, 1), torch.zeros(4, 2))
    assert len(S.collapsed_experts(S.usage(res.weights))) == 2
    assert routing_aux_losses(res)["collapse"].item() > 1.0


def test_bad_router_arguments():
    with pytest.raises(ValueError, match="num_experts"):
        build_router("cosine", C, 0)
    with pytest.raises(ValueError, match="top_k"):
        build_router("gate", C, 4, top_k=5)
    with pytest.raises(KeyError, match="unknown router 'mlp'"):
        build_router("mlp", C, 4)
    with pytest.raises(ValueError, match="expects 6 patch channels, got 5"):
        build_router("cosine", C, 4)(torch.randn(1, 4, 5, N, N), patch_centers(2, 2))


@pytest.mark.parametrize("name,kw", [("cosine", dict(top_k=1)), ("cosine", dict(threshold=False)),
                                     ("gate", dict(top_k=2, capacity_factor=None)), ("gumbel", dict(hard=True)),
                                     ("uniform", dict(subset=2)), ("shared", {}), ("positional", dict(top_k=1)),
                                     ("expert_choice", dict(capacity_factor=2.0))])
def test_active_fraction_is_the_measured_share_of_experts(name, kw):
    """The protocol's active_fraction (what FLOP counts use) equals the mean share of experts a patch runs."""
    from pce.moe.routers import build_router
    from pce.layers.patched_map import PatchedMap
    from pce.layers.patches import PatchExtractor
    from pce.layers.positional import PositionalEncoding

    torch.manual_seed(0)
    E = 4
    router = build_router(name, in_channels=8 + 4, num_experts=E, **kw).train()
    view = PatchedMap(torch.randn(8, 8, 16, 16), PatchExtractor(4, padding="fit"), PositionalEncoding("coord"))
    w = router.route(view).weights
    measured = (w > 0).float().sum(-1).mean().item() / E
    assert measured == pytest.approx(router.active_fraction, abs=1e-6)
    if name == "gate":  # capacity drops make it an upper bound
        capped = build_router(name, in_channels=12, num_experts=E, top_k=2, capacity_factor=0.5).train()
        assert 0 < (capped.route(view).weights > 0).float().sum(-1).mean().item() / E < capped.active_fraction


def test_active_params_follow_the_router_override():
    from pce.models.flops import active_params_per_token, count_params

    bb = pce_build("pce_tiny", num_experts=4, top_k=2)
    expert = sum(count_params(l.experts) for l in bb.pce_layers())
    assert active_params_per_token(bb) == pytest.approx(count_params(bb) - expert / 2, abs=1)
    bb.set_router_override("shared")  # every patch on expert 0: one expert of four runs
    assert active_params_per_token(bb) == pytest.approx(count_params(bb) - expert * 3 / 4, abs=1)
