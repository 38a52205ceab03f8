"""Pruning and duplicating experts: outputs kept or changed exactly as routing says they must be."""
from __future__ import annotations


import pytest
import torch

import pce
from pce.analysis import routing_maps
from pce.moe.surgery import (apply_structure, duplicate_changes_outputs, duplicate_expert, pce_layers, prune_experts,
                             structure)

X = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def build(router: str = "cosine", top_k=1, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    rk = {"renormalize": True, "top_k": top_k, **kw}
    model = pce.build_backbone("pce_tiny", router=router, num_experts=4, top_k=top_k, router_kwargs=rk)
    for m in model.modules():  # non-trivial batch-norm statistics, so slicing them wrongly shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([f.flatten() for f in model(X).values()])


def usage(model):
    return {n: torch.bincount(m.expert.flatten().clamp_min(0), minlength=m.num_experts)
            for n, m in routing_maps(model, X).items()}


@pytest.mark.parametrize("router,kw", [("cosine", {}), ("gate", {"capacity_factor": None})])
def test_prune_unused_keeps_outputs_prune_used_changes_them(router, kw):
    model = build(router, **kw)
    ref, used = outputs(model), usage(model)
    layer, counts = next((n, c) for n, c in used.items() if (c == 0).any() and (c > 0).sum() > 1)
    idle, busy = int((counts == 0).nonzero()[0]), int(counts.argmax())
    pruned = prune_experts(model, {layer: [idle]})
    assert pce_layers(pruned)[layer].num_experts == 3 and pce_layers(model)[layer].num_experts == 4  # a copy
    assert torch.allclose(outputs(pruned), ref, atol=1e-5)
    assert not torch.allclose(outputs(prune_experts(model, {layer: [busy]})), ref, atol=1e-3)


def test_pruned_bank_holds_the_kept_experts():
    model = build()
    name = next(iter(pce_layers(model)))
    old = pce_layers(model)[name]
    new = pce_layers(prune_experts(model, {name: [0, 2]}))[name]
    c = old.experts.bn1.channels
    for j, i in enumerate([1, 3]):
        assert torch.equal(new.experts.conv1.weights[j], old.experts.conv1.weights[i])
        new_rm, old_rm = new.experts.bn1.running_mean, old.experts.bn1.running_mean
        assert torch.equal(new_rm[j * c:(j + 1) * c], old_rm[i * c:(i + 1) * c])
        assert torch.equal(new.router.keys[j], old.router.keys[i])
    assert new.experts.bn1.running_var.shape == (2 * c,) and new.router.keys.shape[0] == 2


@pytest.mark.parametrize("router,kw", [("cosine", {}), ("gate", {"capacity_factor": None})])
def test_duplicate_keeps_outputs_and_structure_replays(router, kw):
    model = build(router, **kw)
    ref, used = outputs(model), usage(model)
    layer = next(iter(used))
    busy = int(used[layer].argmax())
    dup = duplicate_expert(model, layer, busy)
    assert pce_layers(dup)[layer].num_experts == 5
    assert torch.allclose(outputs(dup), ref, atol=1e-5)
    fresh = apply_structure(build(router, **kw), structure(dup))  # what loading an edited checkpoint does
    fresh.load_state_dict(dup.state_dict())
    assert torch.allclose(outputs(fresh.eval()), ref, atol=1e-5)


def test_duplicate_splits_soft_gate_probability_exactly():
    model = build("gate", top_k=None, capacity_factor=None)
    layer = next(iter(pce_layers(model)))
    with pce.record_routing(model) as a:
        ref = outputs(model)
    dup = duplicate_expert(model, layer, 1)
    with pce.record_routing(dup) as b:
        out = outputs(dup)
    p, q = a.records[0][1].probs, b.records[0][1].probs
    assert torch.allclose(q[..., 1] + q[..., 4], p[..., 1], atol=1e-6) and torch.allclose(q[..., 1], q[..., 4])
    assert torch.allclose(q[..., [0, 2, 3]], p[..., [0, 2, 3]], atol=1e-6)
    assert torch.allclose(out, ref, atol=1e-4)


def test_jittered_duplicate_shares_the_load():
    model = build()
    used = usage(model)
    layer = max(used, key=lambda n: int(used[n].max()))
    busy = int(used[layer].argmax())
    after = usage(duplicate_expert(model, layer, busy, jitter=0.05))[layer]
    assert after[busy] + after[4] == used[layer][busy] and after[4] > 0 and after[busy] > 0
    others = [e for e in range(4) if e != busy]
    assert torch.equal(after[others], used[layer][others])  # the other experts keep their patches


@pytest.mark.parametrize("router,top_k,kw,exact", [
    ("cosine", 1, {}, True),                                      # renormalised top-1: weight 1, whichever copy
    ("cosine", 1, {"renormalize": "straight_through"}, True),
    ("gate", None, {"capacity_factor": None, "renormalize": False}, True),  # soft gate: logits lowered by log 2
    ("cosine", 1, {"renormalize": False}, False),                 # the demo router: weights are probabilities
    ("gate", 1, {"capacity_factor": None, "renormalize": False}, False),
    ("cosine", None, {"renormalize": False}, False),              # soft, no logit bias to split the probability
    ("gate", 2, {"capacity_factor": None}, False),                # the copy takes another expert's top-2 place
])
def test_duplicate_changes_outputs_exactly_where_it_says(router, top_k, kw, exact):
    """Issue #23: ``duplicate_changes_outputs`` is None exactly where the outputs are kept (every layer, busiest
    expert); ``exact=True`` refuses the others."""
    model = build(router, top_k=top_k, **kw)
    ref, used = outputs(model), usage(model)
    for layer, counts in used.items():
        busy = int(counts.argmax())
        why = duplicate_changes_outputs(pce_layers(model)[layer])
        assert (why is None) == exact, why
        if exact:
            assert torch.allclose(outputs(duplicate_expert(model, layer, busy, exact=True)), ref, atol=1e-5)
        else:
            assert not torch.allclose(outputs(duplicate_expert(model, layer, busy, warn=False)), ref, atol=1e-5)
            with pytest.raises(ValueError, match="changes the outputs"):
                duplicate_expert(model, layer, busy, exact=True)


def test_bad_edits_are_errors():
    model = build()
    name = next(iter(pce_layers(model)))
    with pytest.raises(ValueError, match="cannot remove all"):
        prune_experts(model, {name: [0, 1, 2, 3]})
    with pytest.raises(KeyError, match="no PCE layer"):
        prune_experts(model, {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        duplicate_expert(model, name, 7)
