import copy
import functools

import pytest
import torch

from pce.moe.experts import EXPERTS
from pce.models.layer import PCELayer
from pce.registry import ROUTERS
from routing_helpers import run_routed
from pce.moe.routing import Router


@pytest.mark.parametrize("router", ROUTERS.names())
@pytest.mark.parametrize("expert", EXPERTS.names())
def test_every_router_expert_combination(router, expert):
    layer = PCELayer(8, patch_size=4, num_experts=3, router=router, expert=expert)
    x = torch.randn(2, 8, 8, 12, requires_grad=True)
    y, (r,) = run_routed(layer, x)
    assert y.shape == x.shape
    assert r.weights.shape == (2, 6, 3) and r.grid == (2, 3)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _twins(execution_a, execution_b, *args, **kwargs):
    """Two layers built with the same arguments and state dict, each with its own execution strategy."""
    a = PCELayer(*args, execution=execution_a, **kwargs)
    b = PCELayer(*args, execution=execution_b, **kwargs)
    b.load_state_dict(a.state_dict())
    assert (a.execution, b.execution) == (execution_a, execution_b)
    return a, b


def _forward_backward(layer, x, seed=1):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, (r,) = run_routed(layer, x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return y, r.weights, x.grad, grads


@pytest.mark.parametrize("router,kw", [("cosine", {}), ("cosine", {"top_k": 1}), ("gate", {}),
                                       ("expert_choice", {}), ("uniform", {"top_k": 2})])
def test_auto_execution_equals_reference(router, kw):
    """``auto`` resolves to a fast path (``sparse`` for routers with exact zeros, else ``dense`` on CPU), never to
    the reference loop; outputs and gradients equal the reference's."""
    torch.manual_seed(0)
    auto, ref = _twins("auto", "reference", 6, patch_size=2, num_experts=4, router=router, **kw)
    resolved = auto.strategy.resolve(auto.router, torch.device("cpu"))
    assert resolved.name in ("sparse", "dense") and resolved.name == ("sparse" if auto.router.is_sparse else "dense")
    x = torch.randn(2, 6, 6, 6)
    a, b = _forward_backward(auto, x), _forward_backward(ref, x)
    torch.testing.assert_close(a[1], b[1])  # same routing
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=1e-4)
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        torch.testing.assert_close(a[3][k], b[3][k], atol=1e-4, rtol=1e-3, msg=k)


def test_execution_is_the_strategy_and_switches_it():
    layer = PCELayer(4, patch_size=2, num_experts=2)
    assert layer.execution == "auto" and type(layer.strategy).__name__ == "AutoExecution"
    layer.execution = "sparse"
    assert type(layer.strategy).__name__ == "SparseExecution" and layer.spec.execution == "sparse"
    with pytest.raises(ValueError, match=r"execution must be one of \(.*'map'.*\), got 'fast'"):
        layer.execution = "fast"
    with pytest.raises(ValueError, match="execution='map' already gives experts their neighbours"):
        PCELayer(4, patch_size=2, halo=1).execution = "map"
    assert layer.execution == "sparse"


def test_dropped_patches_output_their_input():
    layer = PCELayer(4, patch_size=2, num_experts=2, router="gate",
                     router_kwargs={"top_k": 1, "capacity_factor": 0.5})
    x = torch.randn(1, 4, 4, 8)
    y, (r,) = run_routed(layer, x)
    dropped = (r.weights.sum(-1) == 0)[0]  # [P] over a 2x4 grid
    assert dropped.any()
    for p in dropped.nonzero().flatten().tolist():
        i, j = divmod(p, 4)
        torch.testing.assert_close(y[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2], x[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2])


def test_patches_are_processed_in_isolation_without_halo():
    layer = PCELayer(4, patch_size=4, num_experts=2, router="uniform").eval()
    x = torch.randn(1, 4, 8, 8)
    x2 = x.clone()
    x2[..., 4:, 4:] += 5  # change only the last patch
    d = (layer(x) - layer(x2)).abs()
    assert d[..., :4, :].max() == 0 and d[..., :, :4].max() == 0


def test_halo_and_map_context_see_neighbours():
    for kw in ({"halo": 1}, {"execution": "map"}):
        layer = PCELayer(4, patch_size=4, num_experts=2, router="uniform", **kw).eval()
        x = torch.randn(1, 4, 8, 8)
        x2 = x.clone()
        x2[..., 4:, 4:] += 5
        d = (layer(x) - layer(x2)).abs()
        assert d[..., 3, 3].max() > 0  # the neighbouring patch's corner pixel changes


def test_map_execution_equals_patch_execution_on_a_single_patch():
    # with patch_size == map size there is a single patch, so map and patch semantics coincide
    torch.manual_seed(0)
    iso, whole = _twins("reference", "map", 4, patch_size=8, num_experts=3, router="cosine")
    x = torch.randn(2, 4, 8, 8)
    a, b = _forward_backward(iso, x), _forward_backward(whole, x)
    for i, what in enumerate(("output", "routing", "input gradient")):
        torch.testing.assert_close(a[i], b[i], atol=1e-5, rtol=1e-4, msg=what)
    assert a[3].keys() == b[3].keys() and any(k.startswith("router.") for k in a[3])
    for k in a[3]:
        torch.testing.assert_close(a[3][k], b[3][k], atol=1e-4, rtol=1e-3, msg=k)


def test_options_positions_fourier_overlap():
    x = torch.randn(2, 5, 8, 8)
    for kw in ({"experts_see_position": True}, {"pos_encoding": "fourier", "num_frequencies": 2},
               {"pos_encoding": "none"}, {"patch_stride": 2}, {"experts_see_position": True, "halo": 1}):
        y = PCELayer(5, patch_size=4, num_experts=2, **kw)(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_padding_policy():
    x = torch.randn(1, 4, 7, 9)
    assert PCELayer(4, patch_size=4)(x).shape == x.shape
    with pytest.raises(ValueError, match="7x9 does not fit patches of 4"):
        PCELayer(4, patch_size=4, padding="error")(x)


def test_bad_layer_inputs():
    with pytest.raises(ValueError, match=r"expects \[B, 4, H, W\]"):
        PCELayer(4, patch_size=2)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="num_experts"):
        PCELayer(4, patch_size=2, num_experts=0)
    with pytest.raises(ValueError, match="execution"):
        PCELayer(4, patch_size=2, execution="fast")
    with pytest.raises(KeyError, match="unknown router"):
        PCELayer(4, patch_size=2, router="nope")


def test_router_override_and_restore():
    layer = PCELayer(4, patch_size=2, num_experts=4, router="cosine", top_k=1)
    x = torch.randn(1, 4, 4, 4)
    layer.set_router_override("uniform")
    layer.eval()
    _, (r,) = run_routed(layer, x)
    assert torch.allclose(r.weights, torch.full_like(r.weights, 0.25))  # eval: all experts averaged
    layer.train()
    _, (r,) = run_routed(layer, x)
    assert ((r.weights > 0).sum(-1) == 1).all()  # training: one random expert (the router's top_k)
    keys = set(PCELayer(4, patch_size=2, num_experts=4, router="cosine", top_k=1).state_dict())
    assert set(layer.state_dict()) == keys  # the override has no state: checkpoints are unchanged
    assert layer.router_override is not None and not list(layer.router_override.parameters())
    layer.set_router_override(None)
    _, (r,) = run_routed(layer, x)
    assert ((r.weights > 0).sum(-1) == 1).all()


def test_pointwise_conv_equals_conv2d():
    from pce.layers.pointwise import PointwiseConv

    pw = PointwiseConv(6, 4)
    conv = torch.nn.Conv2d(6, 4, 1)
    conv.load_state_dict(pw.state_dict())
    for shape in ((3, 6, 5, 7), (3, 6, 2, 3), (20, 6, 2, 2)):  # convolution, matrix product on a tiny map, conv
        x = torch.randn(*shape, requires_grad=True)
        y = pw(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
        g1, = torch.autograd.grad((pw(x) * torch.arange(4.0).view(1, 4, 1, 1)).sum(), x)
        g2, = torch.autograd.grad((conv(x) * torch.arange(4.0).view(1, 4, 1, 1)).sum(), x)
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(router="cosine", top_k=1), dict(router="cosine", pos_encoding="fourier"),
                                dict(router="gumbel"), dict(router="cosine", pos_encoding="none"),
                                dict(router="cosine", padding="pad", experts_see_position=True)])
@pytest.mark.parametrize("n", [4, 8, 6])
def test_router_on_projected_map_equals_router_on_patch_copies(kw, n):
    """The layer routes from the projected map cut into patches (no C + Pc channel patch copy); same weights,
    outputs and gradients as routing the concatenated patches."""
    torch.manual_seed(0)
    fast = PCELayer(6, patch_size=n, num_experts=3, **kw)
    slow = copy.deepcopy(fast)
    slow.router.route = functools.partial(Router.route, slow.router)  # the generic path: concatenated patches
    x = torch.randn(2, 6, 2 * n + 2, 3 * n) if kw.get("padding") == "pad" else torch.randn(2, 6, 2 * n, 3 * n)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(1)
    ya, (ra,) = run_routed(fast, xa)
    torch.manual_seed(1)
    yb, (rb,) = run_routed(slow, xb)
    torch.testing.assert_close(ra.weights, rb.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    (ya.square().sum() + ra.weights.sum()).backward()
    (yb.square().sum() + rb.weights.sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.router.proj.weight.grad, slow.router.proj.weight.grad, atol=1e-4, rtol=1e-3)  # sums over all pixels, in another order
