"""``pce.moe.plan.RoutePlan``: the per-expert chunk path (``chunks`` / ``place`` / ``weigh_chunks``) that
``dispatch_sparse`` takes when no token has several experts, checked against an independent computation
(``index_select`` of each expert's tokens, the expert, ``index_add`` into zeros), in values and gradients, for a
permutation (top-1), drops (some tokens without an expert) and every token on one expert; and the lazy patch
centres of ``PatchedMap``."""
from __future__ import annotations

import pytest
import torch

from pce.layers.patched_map import PatchedMap
from pce.layers.patches import PatchExtractor
from pce.layers.positional import PositionalEncoding, patch_centers
from pce.moe.dispatch import dispatch_sparse
from pce.moe.experts import build_expert_bank
from pce.moe.plan import RoutePlan

N, C, E = 12, 3, 3


def _weights(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(N, E)
    if kind == "one":
        w[:, 1] = torch.rand(N, generator=gen) + 0.5
        return w
    expert = torch.randint(0, E, (N,), generator=gen)
    w[torch.arange(N), expert] = torch.rand(N, generator=gen) + 0.5
    if kind == "drops":
        w[::4] = 0
    return w


def _independent(bank, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each expert on its own tokens, weighted, summed into zeros: no plan involved."""
    out = torch.zeros(x.shape[0], bank.out_channels, *x.shape[-2:])
    for e in range(E):
        idx = (w[:, e] != 0).nonzero().squeeze(1)
        if idx.numel():
            out = out.index_add(0, idx, bank.forward_one(x.index_select(0, idx), e) * w[idx, e].view(-1, 1, 1, 1))
    return out


@pytest.mark.parametrize("kind", ["permutation", "drops", "one"])
def test_chunk_path_equals_independent_computation(kind):
    torch.manual_seed(0)
    bank = build_expert_bank("residual", E, C, C).eval()
    w0 = _weights(kind)
    plan = RoutePlan(w0, E)
    assert not plan.multi and plan.permutation == (kind != "drops") and plan.identity == (kind == "one")
    x0, g = torch.randn(N, C, 4, 4), torch.randn(N, C, 4, 4)
    results = []
    for fn in (dispatch_sparse, _independent):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        bank.zero_grad(set_to_none=True)
        y = fn(bank, x, w)
        (y * g).sum().backward()
        results.append((y.detach(), x.grad, w.grad, [p.grad.clone() for p in bank.parameters() if p.grad is not None]))
    (y, gx, gw, gp), (y_ref, gx_ref, gw_ref, gp_ref) = results
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    assert len(gp) == len(gp_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)
    if kind == "drops":  # dropped tokens: zero output and zero input gradient
        assert y[::4].abs().sum() == 0 and gx[::4].abs().sum() == 0


def test_place_inverts_chunks():
    plan = RoutePlan(_weights("drops"), E)
    x = torch.randn(N, 2)
    chunks = plan.chunks(x)
    assert [c.shape[0] for c in chunks] == [plan.counts[e] for e in plan.experts]
    back = plan.place(chunks)
    kept = (_weights("drops") != 0).any(1)
    torch.testing.assert_close(back[kept], x[kept])
    assert back[~kept].abs().sum() == 0


def test_weights_of_one_without_gradient_are_not_multiplied():
    w = (_weights("permutation") != 0).float()
    plan = RoutePlan(w, E)
    ys = [torch.randn(c, 2) for c in (plan.counts[e] for e in plan.experts)]
    assert all(a is b for a, b in zip(plan.weigh_chunks(ys, w), ys))  # same values, no copy
    halves = plan.weigh_chunks(ys, w * 0.5)
    assert all(torch.equal(h, y * 0.5) for h, y in zip(halves, ys))
    wg = w.clone().requires_grad_()  # a gradient is needed: multiplied, so it reaches the weights
    assert all(r.grad_fn is not None for r in plan.weigh_chunks(ys, wg))


def test_patch_centres_are_built_on_first_use():
    view = PatchedMap(torch.randn(2, 3, 8, 12), PatchExtractor(4), PositionalEncoding("coord"))
    assert view._positions is None
    torch.testing.assert_close(view.positions, patch_centers(2, 3))
    assert view.positions is view._positions
