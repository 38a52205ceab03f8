"""execution="context": each pixel computed by its patch's expert, convolutions reading across patch borders.

Checked against an independent whole-map computation: every convolution of every expert on the full map,
combined per pixel with the experts' masks, batch norm with each expert's statistics over its own pixels.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from pce.moe.dispatch import dispatch_context
from pce.moe.experts import build_expert_bank
from pce.models.layer import PCELayer
from pce.layers.patches import PatchExtractor
from routing_helpers import run_routed
from pce.layers.patched_map import PatchedMap
from pce.moe.execution import ContextExecution


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
