"""PCEConv2d: a drop-in nn.Conv2d with routed kernels (issue #21).

Checked against independent computations written here: the original convolution (upcycling is exact), a
per-patch loop of F.conv2d with zero padding (isolated execution) and every expert on the whole map with
per-pixel weights (context execution)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pce
from pce.moe.balance import batch_entropy_balance
from pce.moe.surgery import prune_experts
from routing_helpers import run_routed

CONVS = {  # nn.Conv2d keyword arguments
    "k1": dict(kernel_size=1),
    "k3": dict(kernel_size=3, padding=1),
    "k3_s2": dict(kernel_size=3, padding=1, stride=2),
    "k3_d2": dict(kernel_size=3, padding=2, dilation=2),
    "k3_g4_nobias": dict(kernel_size=3, padding=1, groups=4, bias=False),
    "k3x5_valid_s21": dict(kernel_size=(3, 5), stride=(2, 1)),
}


def _bounds(size, parts):
    """Cell borders round(i * size / parts), halves up (written independently of pce.layers.patches)."""
    parts = min(parts, size)
    return [math.floor(i * size / parts + 0.5) for i in range(parts + 1)]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_from_conv_computes_the_original_conv(name, top_k):
    conv = nn.Conv2d(8, 12, **CONVS[name])
    x = torch.randn(2, 8, 13, 11)
    for router, dispatch in [("gap_conv", "sparse"), ("positional", "dense"), ("positional", "sparse")]:
        layer = PCEConv2d_from(conv, top_k, router, dispatch)
        y, (r,) = run_routed(layer, x)
        assert y.shape == conv(x).shape
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
        assert r.weights.shape[1:] == (9, 4) and r.grid == (3, 3)
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(2, 9))  # renormalised top-k
        if router == "positional":
            assert len(r.weights.nonzero()[:, 2].unique()) == 4  # every expert takes part


def PCEConv2d_from(conv, top_k, router="gap_conv", dispatch="auto", **kw):
    rkw = {"noise_std": 0.0} if router == "positional" else {}
    return pce.PCEConv2d.from_conv(conv, num_experts=4, top_k=top_k, grid=3, router=router,
                                   layer_options={"dispatch": dispatch}, **rkw, **kw).eval()


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
def test_from_conv_keeps_padding_modes_and_train_mode():
    for kw in (dict(padding="same", kernel_size=4), dict(padding=1, kernel_size=3, padding_mode="reflect")):
        conv = nn.Conv2d(4, 6, **kw).train()
        layer = pce.PCEConv2d.from_conv(conv, top_k=2)
        assert layer.training
        x = torch.randn(1, 4, 10, 9)
        torch.testing.assert_close(layer.eval()(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_isolated_equals_a_per_patch_loop(stride, dispatch):
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=stride)
    layer = PCEConv2d_from(conv, 2, "positional", dispatch, noise=0.5, execution="isolated")
    x = torch.randn(2, 4, 17, 23)
    y, (r,) = run_routed(layer, x)
    W, b = layer.experts.weight, layer.experts.bias  # [E, 6, 4, 3, 3], [E, 6]
    Ho, Wo = y.shape[-2:]
    rows, cols = _bounds(Ho, 3), _bounds(Wo, 3)
    in_rows = [a * stride for a in rows[:-1]] + [17]  # own input pixels of each cell ('same' padding)
    in_cols = [a * stride for a in cols[:-1]] + [23]
    ref = torch.zeros_like(y)
    for i in range(3):
        for j in range(3):
            patch = x[:, :, in_rows[i]:in_rows[i + 1], in_cols[j]:in_cols[j + 1]]
            for e in range(4):
                out = F.conv2d(patch, W[e], b[e], stride=stride, padding=1)  # zero padding: the patch alone
                w = r.weights[:, 3 * i + j, e, None, None, None]
                ref[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] += out * w
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert (y - conv(x)).abs().max() > 1e-2  # the experts differ: the reference is not trivially the conv


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("name", ["k3", "k3_s2", "k3_d2", "k3x5_valid_s21", "k3_g4_nobias"])
def test_context_equals_every_expert_on_the_map(name, top_k):
    conv = nn.Conv2d(8, 8, **CONVS[name])
    x = torch.randn(2, 8, 17, 14)
    ys = {}
    for dispatch in ("sparse", "dense"):
        torch.manual_seed(3)
        layer = PCEConv2d_from(conv, top_k, "positional", dispatch, noise=0.5)
        ys[dispatch], (r,) = run_routed(layer, x)
    pads = conv.padding
    W, b = layer.experts.weight, layer.experts.bias
    Ho, Wo = ys["dense"].shape[-2:]
    rows, cols = _bounds(Ho, 3), _bounds(Wo, 3)
    ref = 0
    for e in range(4):
        full = F.conv2d(x, W[e], None if b is None else b[e], conv.stride, pads, conv.dilation, conv.groups)
        wmap = torch.zeros(2, 1, Ho, Wo)
        for p in range(9):
            i, j = divmod(p, 3)
            wmap[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = r.weights[:, p, e, None, None, None]
        ref = ref + full * wmap
    torch.testing.assert_close(ys["dense"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ys["sparse"], ref, atol=1e-5, rtol=1e-5)


def test_grid_gives_a_fixed_number_of_patches():
    layer = pce.PCEConv2d(4, 4, 3, padding=1, grid=3, top_k=1)
    for size, cells in [((45, 45), [15] * 3), ((64, 64), [21, 22, 21]), ((17, 23), [6, 5, 6])]:
        _, (r,) = run_routed(layer, torch.randn(1, 4, *size))
        assert r.weights.shape == (1, 9, 4) and r.grid == (3, 3)
        assert [b - a for a, b in zip(layer.cells(*size).rows, layer.cells(*size).rows[1:])] == cells
    _, (r,) = run_routed(pce.PCEConv2d(4, 4, 3, padding=1, patch_size=16), torch.randn(1, 4, 56, 40))
    assert r.grid == (4, 3) and r.patch_size is None  # cells of 14 x 13 or 14
    _, (r,) = run_routed(pce.PCEConv2d(4, 4, 3, padding=1, grid=(2, 4)), torch.randn(1, 4, 8, 8))
    assert r.grid == (2, 4) and r.weights.shape[1] == 8
    _, (r,) = run_routed(layer, torch.randn(1, 4, 2, 5))  # smaller than the grid: one cell per pixel
    assert r.grid == (2, 3)


@pytest.mark.parametrize("router", pce.ROUTERS.names())
def test_every_router_trains_in_a_pce_conv(router):
    layer = pce.PCEConv2d(6, 8, 3, padding=1, num_experts=4, top_k=2, router=router).train()
    x = torch.randn(2, 6, 12, 10, requires_grad=True)
    y, results = run_routed(layer, x)
    aux = pce.router_loss(results, {"balance": 0.01, "z": 0.001, "entropy": 0.01})
    assert y.shape == (2, 8, 12, 10) and torch.isfinite(aux)
    (y.square().mean() + aux).backward()
    assert torch.isfinite(x.grad).all() and any(p.grad is not None for p in layer.experts.parameters())


def test_gradients_reach_experts_and_router():
    layer = PCEConv2d_from(nn.Conv2d(4, 4, 3, padding=1), 2, "gap_conv", "sparse", noise=0.1).train()
    y, (r,) = run_routed(layer, torch.randn(2, 4, 12, 12))
    y.square().mean().backward()
    used = (r.weights != 0).any(0).any(0)
    grads = [w.grad for w in layer.experts.conv.weights]
    assert all((g is not None and g.abs().sum() > 0) == bool(u) for g, u in zip(grads, used))
    assert layer.router.scorer.mlp[-1].weight.grad.abs().sum() > 0  # through the renormalised top-2 weights
    top1 = PCEConv2d_from(nn.Conv2d(4, 4, 3, padding=1), 1, "gap_conv", "sparse").train()
    y, (r,) = run_routed(top1, torch.randn(2, 4, 12, 12))
    y.square().mean().backward(retain_graph=True)  # straight-through renormalisation: top-1 still gets gradient
    head = top1.router.scorer.mlp[-1].weight
    assert head.grad.abs().sum() > 1e-6
    head.grad = None
    pce.router_loss([r], {"balance": 1.0}).backward()
    assert head.grad.abs().sum() > 1e-6


def test_recorder_names_router_loss_and_balance_per_layer():
    model = nn.Sequential(pce.PCEConv2d(3, 8, 3, padding=1, balance="entropy"), nn.ReLU(),
                          pce.PCEConv2d(8, 8, 3, stride=2, padding=1, router="gate", top_k=1))
    with pce.record_routing(model) as rec:
        model(torch.randn(2, 3, 16, 16))
    assert rec.names == ["0", "2"]
    assert pce.router_loss(rec.results, {"balance": 0.01}).requires_grad
    loss = pce.router_loss(rec.results, {"balance": 1.0, "z": 0.0})  # each layer's own balance choice
    expect = (batch_entropy_balance(rec.results[0]) + pce.moe.losses.routing_aux_losses(rec.results[1])["balance"]) / 2
    torch.testing.assert_close(loss, expect)
    uniform = pce.RoutingResult(torch.full((2, 3, 4), 0.25), torch.full((2, 3, 4), 0.25))
    collapsed = pce.RoutingResult(torch.eye(4)[[0, 0, 0]].expand(2, 3, 4), torch.eye(4)[[0, 0, 0]].expand(2, 3, 4))
    assert batch_entropy_balance(uniform).abs() < 1e-6
    assert batch_entropy_balance(collapsed) == pytest.approx(math.log(4), rel=1e-5)


def test_surgery_prunes_a_pce_conv_and_override_routes():
    model = nn.Sequential(PCEConv2d_from(nn.Conv2d(4, 4, 3, padding=1), 2, "gap_conv", noise=0.1))
    small = prune_experts(model, {"0": [1]})
    assert small[0].experts.weight.shape[0] == 3 and small[0].num_experts == 3
    torch.testing.assert_close(small[0].experts.weight, model[0].experts.weight[[0, 2, 3]])
    _, (r,) = run_routed(small, torch.randn(1, 4, 9, 9))
    assert r.weights.shape == (1, 9, 3)
    layer = copy.deepcopy(model[0])
    layer.set_router_override("shared")
    _, (r,) = run_routed(layer, torch.randn(1, 4, 9, 9))
    assert (r.weights[..., 0] == 1).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="execution"):
        pce.PCEConv2d(4, 4, 3, execution="map")
    with pytest.raises(ValueError, match="patch_size or grid"):
        pce.PCEConv2d(4, 4, 3, patch_size=4, grid=3)
    with pytest.raises(ValueError, match=r"PCEConv2d expects input \[B, 4, H, W\]"):
        pce.PCEConv2d(4, 4, 3)(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("execution", ["context", "isolated"])
def test_router_sees_each_cells_input_region_pooled(execution):
    layer = pce.PCEConv2d(3, 4, 3, stride=2, padding=1, grid=(2, 3), router_size=4, execution=execution)
    seen = []
    route = layer.router.route
    layer.router.route = lambda view: seen.append(view.content()) or route(view)
    x = torch.randn(2, 3, 19, 26)
    y = layer(x)
    rows, cols = _bounds(y.shape[2], 2), _bounds(y.shape[3], 3)
    for i in range(2):
        for j in range(3):
            if execution == "context":  # the receptive field of the cell's outputs, clipped to the map
                r0, r1 = max(rows[i] * 2 - 1, 0), min((rows[i + 1] - 1) * 2 + 2, 19)
                c0, c1 = max(cols[j] * 2 - 1, 0), min((cols[j + 1] - 1) * 2 + 2, 26)
            else:  # the cell's own input pixels
                r0, r1 = rows[i] * 2, (rows[i + 1] * 2 if i < 1 else 19)
                c0, c1 = cols[j] * 2, (cols[j + 1] * 2 if j < 2 else 26)
            expect = F.adaptive_avg_pool2d(x[:, :, r0:r1, c0:c1], 4)
            torch.testing.assert_close(seen[0][:, 3 * i + j], expect, atol=1e-5, rtol=1e-5)


def test_gap_conv_router_is_convs_gap_linear():
    r = pce.build_router("gap_conv", 5, 3, hidden=16, num_convs=2, top_k=1)
    convs = [m for m in r.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(5, 16, (3, 3)), (16, 16, (3, 3))]
    patches = torch.randn(2, 4, 5, 6, 6)
    h = patches.flatten(0, 1)
    for c in convs:
        h = F.relu(c(h))
    logits = r.scorer.mlp[-1](h.mean((2, 3))).reshape(2, 4, 3)
    res = r(patches, torch.zeros(4, 2))
    torch.testing.assert_close(res.logits, logits)
    assert ((res.weights > 0).sum(-1) == 1).all()


def test_auto_dispatch_runs_sparse_windows_for_top_k_and_dense_maps_for_soft_routing(monkeypatch):
    import pce.models.pce_conv as mod

    calls = []
    for fn in ("dispatch_rows", "dispatch_map", "dispatch_dense"):
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, real=real, fn=fn, **k: calls.append(fn) or real(*a, **k))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 24, 24)
    for top_k, expect in [(1, "dispatch_rows"), (None, "dispatch_map")]:
        calls.clear()
        layer = PCEConv2d_from(conv, top_k, "positional", "auto")
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
        assert calls == [expect]


@pytest.mark.filterwarnings("ignore:The tensor attribute")  # PositionalEncoding's cache, as for PCELayer
def test_graph_capture_runs_the_dense_path_and_fx_keeps_the_layer_whole():
    model = nn.Sequential(PCEConv2d_from(nn.Conv2d(4, 6, 3, padding=1), 2, "gap_conv", noise=0.2), nn.ReLU())
    x = torch.randn(2, 4, 13, 10)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1"]
    ref = model(x)
    with pce.record_routing(traced) as rec:
        torch.testing.assert_close(traced(x), ref)
    assert rec.names == ["0"]
