"""The execution contract: every registered strategy computes what the ``reference`` execution computes.

Two :class:`~pce.models.layer.PCELayer` with the same state dict, one with ``execution="reference"``, one with the
strategy under test, run the same input ``[B, C, H, W]`` (B = 2); their outputs, the input's gradient, every
parameter's gradient (router, experts, projection) and every buffer afterwards (batch-norm running statistics,
router keys) must agree. Cases: ``top_k`` 1, 2 and soft routing; a tiled grid, a grid that pads an odd map,
and one patch covering the map; experts with and without the positional channels, with a halo; routing soft,
top-1 and top-2 by the cosine router and by a capacity router (``gate`` with a capacity factor: drops, and
``capacity`` runs fixed buffers), and every patch on one expert with input-dependent weights (the paths that skip
the gather, or run the expert on the whole map); training and eval mode (eval with non-trivial running
statistics).

The strategies' documented differences are where the cases meet them, not exceptions granted by name:

* a strategy whose experts read across patch borders (``Execution.neighbours``: ``map``, ``context``) equals the
  reference where there is no border, one patch covering the map; on tiled grids ``test_context_execution.py``
  checks ``context`` against a whole-map computation;
* a strategy that runs every expert on every token (:data:`EVERY_TOKEN`, see :mod:`pce.moe.dispatch`) gives its
  batch norms the statistics of all tokens in training, so when routing has exact zeros (top-k, capacity) it is
  compared with the experts' batch norms on running statistics (the weighting, gathering and gradients are
  still the fast path's own);
* a strategy that refuses an option (``check(options)`` at construction, or its forward for routing it cannot
  honour) must say so in one line naming itself; that case is then skipped.
"""
from __future__ import annotations

import itertools
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from pce.models.layer import PCELayer
from pce.moe.routing import Router, RoutingResult
from pce.registry import EXECUTIONS

#: strategies that run every expert on every token (masked by zero weights): batch-norm statistics of all tokens
EVERY_TOKEN = {"fused", "dense", "map", "capacity"}
STRATEGIES = [n for n in EXECUTIONS.names() if n != "reference"]
C, E = 6, 3
#: name -> (map height, map width, patch size): 2x3 patches; 2x3 patches zero-padded to 8x12; one patch
GRIDS: Dict[str, Tuple[int, int, int]] = {"tiled": (8, 12, 4), "padded": (7, 9, 4), "whole": (6, 6, 6)}
OPTIONS = {"plain": {}, "position": {"experts_see_position": True}, "halo": {"halo": 1, "experts_see_position": True}}
_CAPACITY = dict(router="gate", router_kwargs={"capacity_factor": 1.0})
#: name -> PCELayer routing options ("one_expert": the OneExpertRouter override below)
ROUTINGS: Dict[str, dict] = {"soft": {}, "top1": dict(top_k=1), "top2": dict(top_k=2),
                             "capacity_soft": _CAPACITY, "capacity_top1": dict(_CAPACITY, top_k=1),
                             "capacity_top2": dict(_CAPACITY, top_k=2), "one_expert": dict(top_k=1)}
CASES = [c for c in itertools.product(STRATEGIES, ROUTINGS, GRIDS, OPTIONS, ["train", "eval"])
         if c[2] == "whole" or not EXECUTIONS.get(c[0]).neighbours]  # see the module docstring


class OneExpertRouter(Router):
    """Every patch to expert 1, with a weight in (0, 1) that depends on the patch (so gradients reach the input
    through the routing too). Parameter-free: set as ``router_override`` on both layers."""

    parameter_free = True

    def __init__(self) -> None:
        super().__init__(E, top_k=1)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        w = torch.sigmoid(patches.mean((2, 3, 4)))  # [B, P]
        weights = F.one_hot(torch.ones_like(w, dtype=torch.long), E).to(w.dtype) * w[..., None]  # [B, P, E]
        return RoutingResult(weights=weights, probs=weights.detach(), logits=None)


def _randomise_statistics(layer: PCELayer, seed: int) -> None:
    """Non-trivial batch-norm running statistics, so that eval mode tests them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layer.experts.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_var is not None:
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def _pair(name: str, routing: str, patch: int, options: dict) -> Tuple[PCELayer, PCELayer]:
    """``(reference, fast)`` layers with one state dict; ``pytest.skip`` after checking a refusal's message."""
    kwargs = dict(patch_size=patch, num_experts=E, **ROUTINGS[routing], **options)
    torch.manual_seed(0)
    ref = PCELayer(C, execution="reference", **kwargs)
    _randomise_statistics(ref, 1)
    try:
        fast = PCELayer(C, execution=name, **kwargs)
    except ValueError as e:
        _assert_clear_refusal(e, name)
        pytest.skip(f"{name} refuses {options}: {e}")
    fast.load_state_dict(ref.state_dict())
    assert (ref.execution, fast.execution) == ("reference", name)
    if routing == "one_expert":
        ref.router_override, fast.router_override = OneExpertRouter(), OneExpertRouter()
    return ref, fast


def _assert_clear_refusal(error: Exception, name: str) -> None:
    msg = str(error)
    assert "\n" not in msg and f"'{name}'" in msg, f"unclear refusal by {name!r}: {msg!r}"


def _run(layer: PCELayer, x: torch.Tensor, g: torch.Tensor):
    """Output ``[B, C, H, W]``, the input's gradient, parameter gradients (None -> zeros) and buffers."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(2)
    y = layer(x)
    (y * g).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    buffers = {n: b.clone() for n, b in layer.named_buffers() if b.dtype.is_floating_point}
    return y.detach(), x.grad, grads, buffers


def _compare(ref: PCELayer, fast: PCELayer, shape: Tuple[int, ...], name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    y_ref, gx_ref, pg_ref, buf_ref = _run(ref, x, g)
    try:
        y, gx, pg, buf = _run(fast, x, g)
    except ValueError as e:  # routing the strategy cannot honour (e.g. several experts per patch for context)
        _assert_clear_refusal(e, name)
        pytest.skip(f"{name} refuses this routing: {e}")
    assert y_ref.abs().sum() > 0
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4, msg=f"{name}: output")
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4, msg=f"{name}: input gradient")
    assert pg.keys() == pg_ref.keys()
    for k in pg_ref:
        torch.testing.assert_close(pg[k], pg_ref[k], atol=1e-4, rtol=1e-3, msg=f"{name}: gradient of {k}")
    for k in buf_ref:
        torch.testing.assert_close(buf[k], buf_ref[k], atol=1e-5, rtol=1e-4, msg=f"{name}: buffer {k}")


@pytest.mark.parametrize("name,routing,grid,opt,mode", CASES, ids=["-".join(c) for c in CASES])
def test_strategy_equals_reference(name, routing, grid, opt, mode):
    H, W, patch = GRIDS[grid]
    ref, fast = _pair(name, routing, patch, OPTIONS[opt])
    for layer in (ref, fast):
        layer.train(mode == "train")
        if mode == "train" and ref.current_router().is_sparse and name in EVERY_TOKEN:
            layer.experts.eval()  # batch-norm statistics of every token by design: compare the rest
    _compare(ref, fast, (2, C, H, W), name)


def test_every_registered_strategy_is_covered():
    """The cases come from the registry when this module is collected (strategies registered later, like the
    architecture doc's example, are not in them): every built-in strategy has cases."""
    assert {"auto", "capacity", "context", "dense", "fused", "map", "sparse"} <= set(STRATEGIES)
    assert {n for n, *_ in CASES} == set(STRATEGIES) <= set(EXECUTIONS.names())


def test_refusals_are_one_line_errors_naming_the_strategy():
    """What the contract skips must be refused loudly: halo with neighbour-reading strategies, several experts per
    patch with ``context``, and an unknown name (listing the known ones)."""
    for name in (n for n in STRATEGIES if EXECUTIONS.get(n).neighbours):
        with pytest.raises(ValueError) as info:
            PCELayer(C, patch_size=4, num_experts=E, halo=1, execution=name)
        _assert_clear_refusal(info.value, name)
    layer = PCELayer(C, patch_size=4, num_experts=E, top_k=2, execution="context")
    with pytest.raises(ValueError, match="execution='context' needs at most one expert per patch"):
        layer(torch.randn(2, C, 8, 8))
    with pytest.raises(ValueError, match="execution must be one of .*'reference'.*got 'fast'"):
        layer.execution = "fast"
    assert layer.execution == "context"
