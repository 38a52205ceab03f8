"""Routed layers everywhere (issue #21): the walkers of pce.models.routed find PCELayer and PCEConv2d alike in any
model (a converted timm model has no PCEBackbone), the phase controls and the K-Means key initialisation act on
them, the router loss honours each layer's balancing term, FLOP / parameter counts and routing maps see converted
layers. Checked against hand computations."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pce
from pce.analysis.maps import layer_map, routing_maps
from pce.models.backbone import init_router_keys
from pce.models.flops import active_flops, active_params_per_token, count_flops, count_params
from pce.models.routed import (init_keys, key_routers, routed_layers, set_keys_trainable, set_router_override,
                               upcycle_experts)
from pce.moe.balance import batch_entropy_balance
from routing_helpers import run_routed

timm = pytest.importorskip("timm")


def _resnet(**options):
    model = timm.create_model("resnet18", pretrained=False).eval()
    options = {"num_experts": 4, "top_k": 2, "grid": 3, **options}
    return pce.convert(model, "layer4.*.conv2", **options)


# -- the walker and the phase controls ---------------------------------------------------------------------------
def test_walker_finds_every_routed_layer_through_wrappers():
    model, _ = _resnet()
    names = ["layer4.0.conv2", "layer4.1.conv2"]
    assert [n for n, _ in routed_layers(model)] == names
    wrapped = torch.optim.swa_utils.AveragedModel(model)  # EMA wrapper: names without its "module." prefix
    assert [n for n, _ in routed_layers(wrapped)] == names
    backbone = pce.build_backbone("pce_tiny", num_experts=2)
    pce.convert(backbone, "stages.1.down.0", top_k=1)  # a converted conv inside a backbone is one of its layers
    layers = list(backbone.pce_layers())
    assert len(layers) == 5 and isinstance(layers[1], pce.PCEConv2d)
    assert sum(isinstance(m, pce.PCELayer) for m in layers) == 4


def test_router_override_keys_and_upcycling_on_a_converted_model():
    model, _ = _resnet(router="cosine", noise=0.5)
    x = torch.randn(2, 3, 96, 96)  # layer4 maps of 3 x 3: 9 cells
    assert set_router_override(model, "uniform") == 2
    _, results = run_routed(model.train(), x)
    assert all(torch.allclose(r.weights.sum(-1), torch.ones(2, 9)) for r in results)
    assert all((r.weights > 0).sum(-1).eq(2).all() for r in results)  # the learned top-2 carries over (training)
    model.eval()
    assert all(type(layer.current_router()).__name__ == "UniformRouter" for _, layer in routed_layers(model))
    set_router_override(model, None)
    assert all(layer.current_router() is layer.router for _, layer in routed_layers(model))
    keys = list(key_routers(model))
    assert len(keys) == 2 and not any(r.keys.requires_grad for r in keys)
    assert set_keys_trainable(model, True) == 2 and all(r.keys.requires_grad for r in keys)
    layer = model.layer4[0].conv2
    assert not torch.equal(layer.experts.weight[0], layer.experts.weight[1])
    assert upcycle_experts(model) == 2
    assert all(torch.equal(layer.experts.weight[e], layer.experts.weight[0]) for e in range(4))


def test_kmeans_init_on_a_converted_model_uses_each_cells_pooled_view():
    pytest.importorskip("sklearn")
    model, _ = _resnet(router="cosine")
    batches = [torch.randn(4, 3, 96, 96), (torch.randn(4, 3, 96, 96), "targets")]  # 9 cells an image
    reference = copy.deepcopy(model)
    assert init_keys(model, batches, seed=3) == 2
    # by hand: router 0 collects its patches' embeddings over every batch, K-Means with seed 3 ...
    r0 = reference.layer4[0].conv2.router
    r0.start_collecting()
    with torch.no_grad():
        for x in (batches[0], batches[1][0]):
            reference(x)
    emb = r0.stop_collecting()
    assert emb.shape == (2 * 4 * 9, r0.embed_dim)  # 9 cells of every image, as the router routes them
    r0.init_keys(emb, seed=3)
    # ... then router 1 on features produced with router 0's new keys, seed 4
    r1 = reference.layer4[1].conv2.router
    r1.start_collecting()
    with torch.no_grad():
        for x in (batches[0], batches[1][0]):
            reference(x)
    r1.init_keys(r1.stop_collecting(), seed=4)
    for got, ref in zip(key_routers(model), (r0, r1)):
        torch.testing.assert_close(got.keys, ref.keys)
    assert model.training is False


class _BackboneAndHead(nn.Module):
    """A PCE backbone with a plain 3x3 convolution head on its last map (converted below)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = pce.build_backbone("pce_fmnist", router="cosine", num_experts=3)
        self.head = nn.Conv2d(self.backbone.num_features, 8, 3, padding=1)

    def forward(self, x):
        return self.head(list(self.backbone(x).values())[-1])


def test_init_router_keys_covers_backbones_and_converted_layers_outside_them():
    pytest.importorskip("sklearn")
    model = _BackboneAndHead()
    pce.convert(model, "head", router="cosine", num_experts=3, top_k=1, grid=2)
    before = [r.keys.detach().clone() for r in key_routers(model)]
    n_backbone = len(list(model.backbone.key_routers()))
    assert init_router_keys(model, [torch.randn(8, 1, 28, 28)]) == n_backbone + 1 == len(before)
    assert all(not torch.equal(a, r.keys) for a, r in zip(before, key_routers(model)))


# -- router loss: each layer's balancing term --------------------------------------------------------------------
def _result(probs, balance=None):
    probs = torch.tensor(probs)
    top1 = F.one_hot(probs.argmax(-1), probs.shape[-1]).float()
    return pce.RoutingResult(weights=top1, probs=probs, balance=balance)


def test_router_loss_batch_entropy_and_per_layer_balance_by_hand():
    r = _result([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]]])  # B=2, P=2, E=3
    mean = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.4 + 0.2) / 4, (0.1 + 0.3 + 0.1 + 0.6) / 4]
    batch_entropy = math.log(3) + sum(m * math.log(m) for m in mean)
    f = [2 / 4, 1 / 4, 1 / 4]  # top-1 experts 0, 1, 0, 2
    switch = 3 * sum(a * b for a, b in zip(f, mean))
    loss = lambda results, w: pce.router_loss(results, w).item()  # noqa: E731
    assert loss([r], {"batch_entropy": 0.5, "balance": 0.0, "z": 0.0}) == pytest.approx(0.5 * batch_entropy, 1e-5)
    assert loss([r], {"balance": 0.5, "z": 0.0}) == pytest.approx(0.5 * switch, 1e-5)
    stamped = _result(r.probs.tolist(), balance="entropy")
    assert loss([stamped], {"balance": 0.5, "z": 0.0}) == pytest.approx(0.5 * batch_entropy, 1e-5)
    assert loss([_result(r.probs.tolist(), "none")], {"balance": 0.5, "z": 0.0}) == 0.0
    assert loss([r, stamped], {"balance": 1.0, "z": 0.0}) == pytest.approx((switch + batch_entropy) / 2, 1e-5)
    assert batch_entropy_balance(stamped).item() == pytest.approx(batch_entropy, 1e-5)  # one implementation
    assert pce.RouterLossWeights.coerce({"batch_entropy": 0.1}).batch_entropy == 0.1


def test_pce_conv_stamps_its_balance_and_router_loss_honours_it():
    model = nn.Sequential(pce.PCEConv2d(3, 8, 3, padding=1, balance="entropy"), nn.ReLU(),
                          pce.PCEConv2d(8, 8, 3, padding=1, balance="none"), pce.PCEConv2d(8, 8, 1))
    _, (a, b, c) = run_routed(model, torch.randn(2, 3, 12, 12))
    assert (a.balance, b.balance, c.balance) == ("entropy", "none", "switch")
    got = pce.router_loss([a, b, c], {"balance": 1.0, "z": 0.0})
    E = 4
    mean = a.probs.reshape(-1, E).mean(0)
    by_hand_a = math.log(E) + (mean * mean.log()).sum()
    f = F.one_hot(c.weights.reshape(-1, E).argmax(-1), E).float().mean(0)
    by_hand_c = E * (f * c.probs.reshape(-1, E).mean(0)).sum()
    torch.testing.assert_close(got, (by_hand_a + by_hand_c) / 3)
    assert got.requires_grad
    assert a.detach().balance == "entropy" and a.detach().cell_rows == a.cell_rows  # detach keeps every field


# -- FLOPs and parameters -----------------------------------------------------------------------------------------
def test_active_params_and_flops_of_a_converted_model_by_hand():
    original = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 128, 128)
    base_flops = count_flops(original, x)["total"]
    base_params = count_params(original)
    model, report = pce.convert(copy.deepcopy(original), "layer4.*.conv2", input_size=(3, 128, 128),
                                num_experts=4, top_k=2, grid=3, router="positional", noise_std=0.0)
    conv = 512 * 512 * 9  # one kernel's parameters (no bias)
    assert count_params(model) == base_params + 2 * 3 * conv  # 4 kernels instead of 1, a router without parameters
    assert active_params_per_token(model) == base_params + 2 * (2 - 1) * conv  # top-2 of 4
    assert active_params_per_token(model) == count_params(model) - sum(
        (4 - 2) * c.params_before for c in report.layers)
    flops = active_flops(model, x)
    per_layer = 2 * 4 * 4 * conv  # top-2 x a 3x3 conv on the 4x4 map of a 128 input
    assert flops["layers"] == {"layer4.0.conv2": per_layer, "layer4.1.conv2": per_layer}
    assert flops["total"] == base_flops + 2 * (per_layer - 4 * 4 * conv)
    assert flops["total"] - base_flops == report.total("flops_after") - report.total("flops_before")


def test_active_flops_count_the_router_as_the_report_does():
    model, report = _resnet(input_size=(3, 64, 64))  # gap_conv router: it has FLOPs
    flops = active_flops(model, torch.randn(1, 3, 64, 64))
    assert [flops["layers"][c.name] for c in report.layers] == [c.flops_after for c in report.layers]
    assert all(c.flops_after > 2 * c.flops_before for c in report.layers)


# -- routing maps --------------------------------------------------------------------------------------------------
def test_layer_map_places_uneven_cells_on_the_image_by_hand():
    # a 5 x 4 map cut into 2 x 2 uneven cells (rows 0:2, 2:5; cols 0:3, 3:4), on a 10 x 8 image (stride 2)
    weights = torch.zeros(1, 4, 3)
    for p, e in enumerate([2, 0, 1, 2]):
        weights[0, p, e] = 1.0
    r = pce.RoutingResult(weights, weights.clone(), grid=(2, 2), map_size=(5, 4), cell_rows=(0, 2, 5),
                          cell_cols=(0, 3, 4))
    m = layer_map(r, image_size=(10, 8))
    assert m.feature_stride == 2 and m.patch_size is None and m.image_borders() == ((0, 4, 10), (0, 6, 8))
    expect = torch.empty(1, 10, 8, dtype=torch.int64)
    expect[:, :4, :6], expect[:, :4, 6:], expect[:, 4:, :6], expect[:, 4:, 6:] = 2, 0, 1, 2
    assert torch.equal(m.pixels(), expect)
    assert torch.equal(m.pixels(on_image=False), expect[:, ::2, ::2])
    odd = layer_map(r, image_size=(11, 9))  # no integer stride: the ratio of each side
    assert odd.feature_stride is None and odd.image_borders() == ((0, 4, 11), (0, 7, 9))


def test_routing_maps_of_a_converted_smp_head_at_full_resolution():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None).eval()
    pce.convert(model, ["segmentation_head.0", "decoder.seg_blocks.0.block.0.block.0"], grid=3)
    x = torch.randn(2, 3, 64, 64)
    maps = routing_maps(model, x)
    head = maps["segmentation_head.0"]  # on the decoder's 16 x 16 map: cells of 5, 6, 5 pixels
    assert head.map_size == (16, 16) and head.feature_stride == 4 and head.patch_size is None
    assert head.cell_rows == (0, 5, 11, 16)
    borders = [0, 20, 44, 64]  # the cells in image pixels: stride 4
    expect = torch.empty(2, 64, 64, dtype=torch.int64)
    for i in range(3):
        for j in range(3):
            expect[:, borders[i]:borders[i + 1], borders[j]:borders[j + 1]] = head.expert[:, i, j, None, None]
    assert torch.equal(head.pixels(), expect)
    deep = maps["decoder.seg_blocks.0.block.0.block.0"]  # the stride-32 level: a 2 x 2 map, one cell per pixel
    assert deep.grid == (2, 2) and deep.feature_stride == 32 and deep.pixels().shape == (2, 64, 64)


def test_routing_maps_of_a_backbone_cover_the_image():
    model = pce.build_backbone("pce_tiny", num_experts=4, top_k=1)
    maps = routing_maps(model, torch.randn(1, 3, 64, 96))
    for info, m in zip(model.feature_info, maps.values()):
        s, n = info["stride"], info["patch_size"]
        assert m.feature_stride == s and m.map_size == (64 // s, 96 // s)
        assert m.pixels().shape == (1, 64, 96)
        assert torch.equal(m.pixels()[:, ::s * n, ::s * n], m.expert)


@pytest.mark.parametrize("dispatch", ["sparse", "dense", "auto"])
def test_fvcore_flop_count_traces_every_dispatch(dispatch):
    """fvcore traces with torch.jit: the sparse windows (a Python autograd Function) cannot be traced, so a
    trace runs the dense path; the active count is the hand formula whatever the dispatch."""
    from pce.models.flops import active_flops, count_flops

    torch.manual_seed(0)
    conv = pce.PCEConv2d(8, 8, 3, padding=1, dispatch=dispatch, top_k=1).eval()
    x = torch.randn(2, 8, 12, 12)
    assert count_flops(conv, x)["total"] > 0
    k3 = 8 * 8 * 9                                        # MACs per output pixel of one expert
    router = active_flops(conv, x)["total"] - 2 * 12 * 12 * k3
    assert router > 0                                     # top-1: one expert's conv plus the router
    dense = pce.PCEConv2d(8, 8, 3, padding=1, dispatch="dense", top_k=1).eval()
    dense.load_state_dict(conv.state_dict())
    assert active_flops(dense, x)["total"] == active_flops(conv, x)["total"]
