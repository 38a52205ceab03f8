"""execution="context": each pixel computed by its patch's expert, convolutions reading across patch borders.

Checked against an independent whole-map computation: every convolution of every expert on the full map,
combined per pixel with the experts' masks, batch norm with each expert's statistics over its own pixels.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import pce

from pce.moe.dispatch import dispatch_context
from pce.moe.experts import build_expert_bank
from pce.models.layer import PCELayer
from pce.layers.patches import PatchExtractor
from routing_helpers import run_routed
from pce.layers.patched_map import PatchedMap
from pce.moe.execution import ContextExecution
from pce.moe.execution_static import StaticContextExecution


class MaskedMap:
    """Reference selection on whole maps ``[B, C, H, W]`` with per-pixel expert masks ``[E, B, 1, H, W]``."""

    def __init__(self, masks: torch.Tensor, pooled: bool = False) -> None:
        self.masks, self.pooled = masks, pooled

    def conv(self, layer, h):
        out = 0
        for e, m in enumerate(self.masks):
            b = layer.biases[e] if layer.biases is not None else None
            out = out + m * F.conv2d(h, layer.weights[e], b, padding=layer.kernel_size // 2)
        return out

    def norm(self, layer, h):
        out = 0
        c = layer.channels
        for e, m in enumerate(self.masks):
            if m.sum() == 0:
                continue
            w, b = layer.weight[e * c:(e + 1) * c].view(1, -1, 1, 1), layer.bias[e * c:(e + 1) * c].view(1, -1, 1, 1)
            if layer.training:
                ms = self.masks.sum(0) if self.pooled else m  # statistics over the layer's routed pixels
                cnt = ms.sum() * 1.0
                mean = (ms * h).sum((0, 2, 3), keepdim=True) / cnt
                var = (ms * (h - mean) ** 2).sum((0, 2, 3), keepdim=True) / cnt
            else:
                mean = layer.running_mean[e * c:(e + 1) * c].view(1, -1, 1, 1)
                var = layer.running_var[e * c:(e + 1) * c].view(1, -1, 1, 1)
            out = out + m * ((h - mean) / torch.sqrt(var + layer.eps) * w + b)
        return out

    def identity(self, x, channels):
        return x


def _routing(B, P, E, drop, gen):
    choice = torch.randint(0, E, (B * P,), generator=gen)
    w = torch.zeros(B * P, E)
    w[torch.arange(B * P), choice] = torch.rand(B * P, generator=gen) + 0.5
    if drop:
        w[torch.randperm(B * P, generator=gen)[:drop]] = 0
    return w


@pytest.mark.parametrize("expert", ["residual", "double_conv", "conv_bn_relu"])
@pytest.mark.parametrize("E,n,drop,train", [(3, 4, 0, True), (4, 2, 3, True), (2, 3, 1, False), (5, 4, 0, False)])
@pytest.mark.parametrize("norm_stats", ["expert", "layer"])
def test_context_dispatch_matches_whole_map_reference(expert, E, n, drop, train, norm_stats):
    gen = torch.Generator().manual_seed(E * 10 + n)
    B, C, gh, gw = 2, 5, 3, 2
    ext = PatchExtractor(n)
    bank = build_expert_bank(expert, E, C, C).train(train)
    if not train:  # non-trivial running statistics
        for m in bank.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    ref_bank = copy.deepcopy(bank)
    x = torch.randn(B, C, gh * n, gw * n, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grid = ext.grid(gh * n, gw * n)
    P = grid.num_patches
    w = _routing(B, P, E, drop, gen)

    def to_windows(rows, r):
        m = ext.reassemble(rows.reshape(B, P, -1, n, n), grid)
        return ext.extract_windows(m, grid, r).reshape(B * P, -1, n + 2 * r, n + 2 * r)

    tokens = ext.extract(x, grid)[0].reshape(B * P, C, n, n)
    out = dispatch_context(bank, tokens, w, to_windows, norm_stats)
    y = ext.reassemble(out.reshape(B, P, C, n, n), grid)

    # reference: per-pixel expert masks and weights, every expert on the whole map
    wmap = w.reshape(B, gh, gw, E).permute(3, 0, 1, 2).repeat_interleave(n, 2).repeat_interleave(n, 3)  # [E,B,H,W]
    masks = (wmap != 0).float().unsqueeze(2)
    y_ref = ref_bank.run(x_ref, MaskedMap(masks, pooled=norm_stats == "layer"))
    y_ref = sum(wmap[e].unsqueeze(1) * y_ref for e in range(E))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)

    g = torch.randn(y.shape, generator=gen)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    for (name, p), p_ref in zip(bank.named_parameters(), ref_bank.parameters()):
        if p.grad is None:
            assert p_ref.grad is None or p_ref.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_context_with_one_expert_is_that_expert_on_the_whole_map():
    layer = PCELayer(6, patch_size=4, num_experts=3, top_k=1, execution="context")
    layer.set_router_override("shared")
    x = torch.randn(2, 6, 8, 12, requires_grad=True)
    y = layer(x)
    ref = x + layer.proj(layer.experts.forward_one(x, 0))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def _context_and_isolated(**kwargs):
    """A ``context`` layer and a ``sparse`` (isolated patches) layer with one state dict, in eval mode with
    non-trivial batch-norm running statistics."""
    torch.manual_seed(0)
    ctx = PCELayer(4, num_experts=2, router="cosine", top_k=1, execution="context", **kwargs)
    gen = torch.Generator().manual_seed(1)
    for m in ctx.experts.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    iso = PCELayer(4, num_experts=2, router="cosine", top_k=1, execution="sparse", **kwargs)
    iso.load_state_dict(ctx.state_dict())
    assert (ctx.execution, iso.execution) == ("context", "sparse")
    return ctx.eval(), iso.eval()


def test_context_sees_neighbours_and_costs_no_more_than_isolated_patches():
    from pce.models.flops import count_flops

    layer, iso = _context_and_isolated(patch_size=4)
    x = torch.randn(1, 4, 8, 8)
    x2 = x.clone()
    x2[..., 4:, 4:] += 5
    d = (layer(x) - layer(x2)).abs()
    assert d[..., 3, 3].max() > 0 and d[..., 0, 0].max() == 0  # two 3x3 convs: 2 pixels of context, no more
    assert count_flops(layer, x)["total"] == count_flops(iso, x)["total"]


def test_context_equals_isolated_patches_away_from_patch_borders():
    """Same routing, same experts: pixels further than the experts' receptive radius (2: two 3x3 convs) from a
    patch border see nothing of the neighbours, so context and isolated execution agree there (outputs and the
    gradients that reach them), and differ next to the borders."""
    layer, iso = _context_and_isolated(patch_size=8)
    x = torch.randn(2, 4, 16, 24)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(xa), iso(xb)
    inner = torch.zeros(16, 24, dtype=torch.bool)
    for i in range(2):
        for j in range(3):
            inner[8 * i + 2:8 * i + 6, 8 * j + 2:8 * j + 6] = True
    torch.testing.assert_close(ya[..., inner], yb[..., inner], atol=1e-5, rtol=1e-4)
    assert (ya[..., ~inner] - yb[..., ~inner]).abs().max() > 1e-3
    g = torch.randn(ya.shape) * inner  # gradients that reach the input only through the inner pixels
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)


def test_context_rejects_several_experts_per_patch_and_halo():
    layer = PCELayer(4, patch_size=2, num_experts=3, router="cosine", top_k=2, execution="context")
    with pytest.raises(ValueError, match="at most one expert per patch"):
        layer(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="context"):
        PCELayer(4, patch_size=2, halo=1, execution="context")


def test_context_layer_trains_with_padding_and_drops():
    layer = PCELayer(4, patch_size=4, num_experts=2, router="gate", execution="context",
                     router_kwargs={"top_k": 1, "capacity_factor": 0.5})
    x = torch.randn(2, 4, 7, 10, requires_grad=True)
    y, (r,) = run_routed(layer, x)
    assert y.shape == x.shape and (r.weights.sum(-1) == 0).any()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layer_norm_stats_share_running_statistics_and_need_context():
    layer = PCELayer(4, patch_size=2, num_experts=3, top_k=1, execution="context", norm_stats="layer")
    layer(torch.randn(4, 4, 6, 6))
    rm = layer.experts.bn1.running_mean.view(3, -1)
    assert rm.abs().sum() > 0 and torch.equal(rm[1], rm[0]) and torch.equal(rm[2], rm[0])
    with pytest.raises(ValueError, match="norm_stats='layer'.*context"):
        PCELayer(4, patch_size=2, norm_stats="layer")
    with pytest.raises(ValueError, match="norm_stats"):
        PCELayer(4, patch_size=2, execution="context", norm_stats="batch")


@pytest.mark.parametrize("see_position", [False, True])
def test_sole_expert_shortcut_equals_stitched_execution(see_position):
    """Every patch on one expert: the whole-map shortcut gives the stitched execution's outputs and gradients
    (input, per-patch weights, expert parameters), and steps aside for mixed, dropped or padded routing."""
    torch.manual_seed(0)
    layer = PCELayer(5, patch_size=3, num_experts=3, top_k=1, execution="context", experts_see_position=see_position)
    stitched = copy.deepcopy(layer)
    B, H, W = 2, 6, 9
    ext = layer.extractor
    grid = ext.grid(H, W)
    P, n = grid.num_patches, grid.patch_size
    pos = layer.pos(grid.grid_h, grid.grid_w, n, n, torch.device("cpu"), torch.float32)
    x = torch.randn(B, 5, H, W, requires_grad=True)
    w = torch.zeros(B, P, 3)
    w[..., 1] = torch.rand(B, P) + 0.5
    w.requires_grad_(True)
    sole = ContextExecution.sole_expert_on_map
    fast = sole(layer.experts, PatchedMap(x, layer.extractor, layer.pos), w, layer.options)
    assert fast is not None

    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    src = torch.cat([x2, pos.expand(B, -1, -1, -1)], 1) if see_position else x2
    tokens = ext.extract(src, grid)[0].reshape(B * P, -1, n, n)

    def to_windows(rows, r):
        m = ext.reassemble(rows.reshape(B, P, -1, n, n), grid)
        return ext.extract_windows(m, grid, r).reshape(B * P, -1, n + 2 * r, n + 2 * r)

    out = dispatch_context(stitched.experts, tokens, w2.reshape(B * P, -1), to_windows)
    ref = ext.reassemble(out.reshape(B, P, 5, n, n), grid)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (fast * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(layer.experts.named_parameters(), stitched.experts.parameters()):
        if p_ref.grad is None or p_ref.grad.abs().max() == 0:
            assert p.grad is None or p.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(layer.experts.bn1.running_mean, stitched.experts.bn1.running_mean)

    mixed = w.detach().clone()
    mixed[0, 0] = torch.tensor([0.7, 0.0, 0.0])
    dropped = w.detach().clone()
    dropped[1, 2] = 0
    view = PatchedMap(x, layer.extractor, layer.pos)
    assert sole(layer.experts, view, mixed, layer.options) is None
    assert sole(layer.experts, view, dropped, layer.options) is None
    padded = ext.grid(7, 9)  # 7 rows do not tile with 3x3 patches: the grid pads
    assert padded.padded_size != (7, 9)
    assert sole(layer.experts, PatchedMap(torch.randn(B, 5, 7, 9), layer.extractor, layer.pos), w.detach(),
                layer.options) is None


# -- under graph capture: StaticContextExecution, the same computation with static shapes ----------------------------
def _context_layer(expert="residual", norm_stats="expert", see_position=False, drops=True, seed=0):
    """A context layer on 6 channels, 3 experts, 4-pixel patches padded to fit (``padding="pad"``), a gate router
    with straight-through top-1 weights and, with ``drops``, a capacity that drops patches; batch norms with
    non-trivial running statistics."""
    torch.manual_seed(seed)
    layer = PCELayer(6, patch_size=4, num_experts=3, expert=expert, execution="context", norm_stats=norm_stats,
                     experts_see_position=see_position, padding="pad", router="gate",
                     router_kwargs=dict(top_k=1, capacity_factor=0.6 if drops else None,
                                        renormalize="straight_through"))
    gen = torch.Generator().manual_seed(seed + 1)
    for m in layer.experts.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return layer


def _top1(layer, x):
    """Each patch's expert ``[B, P]`` (-1: dropped) for input ``x``."""
    with torch.no_grad():
        (r,) = run_routed(layer, x)[1]
    return torch.where(r.weights.sum(-1) > 0, r.weights.argmax(-1), -1)


def _assert_same_training_step(a, b, xa, xb, ya, yb):
    """Outputs, then (after one backward of the same loss) input, parameter (``None`` = zero) and buffer values."""
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        gq = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(gp, gq, atol=1e-4, rtol=1e-4, msg=name)
    for (name, p), q in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("expert", ["residual", "double_conv", "conv_bn_relu"])
@pytest.mark.parametrize("norm_stats,train,see_position,drops", [
    ("expert", True, False, True), ("expert", False, True, True), ("layer", True, True, True),
    ("layer", False, False, True), ("expert", True, True, False)])
def test_static_context_equals_eager_context(expert, norm_stats, train, see_position, drops):
    """The static whole-map path equals eager context execution on a 9 x 11 map (padded to 12 x 12 by the grid),
    batch 3, routing that differs per patch and drops patches: outputs, gradients of the input, the experts, the
    projection and the router (through the straight-through weights), running statistics after the step."""
    a = _context_layer(expert, norm_stats, see_position, drops).train(train)
    b = copy.deepcopy(a)
    b.strategy = StaticContextExecution()
    x = torch.randn(3, 6, 9, 11, generator=torch.Generator().manual_seed(3)) * 2
    top = _top1(a.eval(), x)
    a.train(train)
    assert len(set(top[top >= 0].tolist())) > 1 and (top < 0).any() == drops  # mixed routing (and drops)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    _assert_same_training_step(a, b, xa, xb, a(xa), b(xb))


def test_static_context_on_fused_experts_and_all_dropped():
    """Batch norms folded into the convolutions (what tools/export.py captures), and a map whose patches are all
    dropped (zeros, as the eager path gives)."""
    from pce.models.fuse import fuse_for_inference

    a = _context_layer().eval()
    b = fuse_for_inference(copy.deepcopy(a))
    b.strategy = StaticContextExecution()
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-4)
    view = PatchedMap(x, a.extractor, a.pos)
    w = torch.zeros(2, view.grid.num_patches, 3)
    with torch.no_grad():
        out = StaticContextExecution()(a.experts, view, w, a.options)
        ref = ContextExecution()(a.experts, PatchedMap(x, a.extractor, a.pos), w, a.options)
    assert out.shape == (2, 6, 9, 11) and torch.equal(out, torch.zeros_like(out)) and torch.equal(ref, out)


@pytest.mark.filterwarnings("ignore:The tensor attribute")  # positional-encoding caches, as tools/export.py
def test_context_under_torch_export_equals_eager():
    """torch.export of a context layer (dynamic batch) and of a small context backbone: the program gives the eager
    outputs on held-back inputs whose routing differs from the capture example's."""
    from pce.models.presets import build_backbone

    layer = _context_layer().eval()
    example = torch.randn(2, 6, 9, 11)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(layer, (example,), dynamic_shapes=({0: batch},)).module()
    gen = torch.Generator().manual_seed(5)
    held_back = [torch.randn(1, 6, 9, 11, generator=gen) * 3 + 1, torch.rand(4, 6, 9, 11, generator=gen)]
    for x in held_back:
        assert not torch.equal(_top1(layer, x)[0], _top1(layer, example)[0])  # other experts for some patch
        with torch.no_grad():
            torch.testing.assert_close(ep(x), layer(x), atol=1e-5, rtol=1e-4)

    torch.manual_seed(0)
    backbone = build_backbone("pce_tiny", stem_channels=8, num_experts=3, top_k=1, execution="context", stages=[
        dict(channels=8, depth=1, patch_size=4, stride=1), dict(channels=16, depth=1, patch_size=3, stride=2)]).eval()
    x0, xs = torch.randn(2, 3, 38, 42), [torch.rand(2, 3, 38, 42) * 4 - 2, torch.randn(2, 3, 38, 42) * 0.3]
    with torch.no_grad():
        prog = torch.export.export(backbone, (x0,)).module()
        with pce.record_routing(backbone) as rec:
            eager = [backbone(x) for x in [x0] + xs]
    tops = [r.weights.argmax(-1) for r in rec.results]
    n = len(tops) // 3
    assert n == 2 and all(any(not torch.equal(tops[i], tops[i + k * n]) for i in range(n)) for k in (1, 2))
    with torch.no_grad():
        for x, want in zip(xs, eager[1:]):
            got = prog(x)
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)


def test_context_under_torch_compile_trains_as_eager():
    """torch.compile (fullgraph; backend "eager": dynamo's capture) of a training step: the same outputs,
    gradients and running statistics as eager context execution, layer and pooled batch-norm statistics."""
    for norm_stats in ("expert", "layer"):
        a = _context_layer(norm_stats=norm_stats).train()
        b = copy.deepcopy(a)
        torch.compiler.reset()
        compiled = torch.compile(b, fullgraph=True, backend="eager")
        x = torch.randn(3, 6, 9, 11)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        _assert_same_training_step(a, b, xa, xb, a(xa), compiled(xb))
