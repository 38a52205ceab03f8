"""FX symbolic tracing of PCE models: torch.fx, torchvision's and timm's FX feature extraction.

PCE layers (and dense layers, deformable attention, the 1x1 convolution) are FX leaves: one ``call_module``
node each, named by module path, that runs the real module; so traced models equal eager ones exactly, on
inputs that route differently, and routing can be recorded on the traced module.
"""
import copy

import pytest
import timm
import torch
from timm.models import create_feature_extractor as timm_feature_extractor
from timm.models._features_fx import FeatureGraphNet
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import pce
import pce.models.timm_models  # noqa: F401  registers the presets with timm
from pce.models.classifier import build_classifier
from pce.models.fx import FX_LEAF_MODULES
from pce.models.presets import build_backbone, list_backbones

PCE_PRESETS = list_backbones("pce_")
DENSE_PRESETS = list_backbones("dense_")
EXECUTIONS = ["auto", "sparse", "capacity", "context", "map", "dense", "fused", "reference"]


def _inputs(name: str, batch: int = 2):
    """Two different inputs of the preset's size (28 for fmnist, 32 for cifar, 64 otherwise)."""
    size = 28 if "fmnist" in name else 32 if "cifar" in name else 64
    chans = 1 if "fmnist" in name else 3
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(batch, chans, size, size, generator=g)
    x2 = torch.rand(batch, chans, size, size, generator=g) * 4 - 1
    return x1, x2


def _routed(module, x):
    with pce.record_routing(module) as rec:
        out = module(x)
    return out, rec.records


def _stage_nodes(backbone):
    return {f"stages.{i}": f"c{i + 1}" for i in range(len(backbone.stages))}


def _assert_same_routing(a, b):
    assert [n for n, _ in a] == [n for n, _ in b]
    for (_, ra), (_, rb) in zip(a, b):
        assert torch.equal(ra.weights, rb.weights)


def _routes_differ(rec1, rec2) -> bool:
    return any(not torch.equal(r1.weights.argmax(-1), r2.weights.argmax(-1)) for (_, r1), (_, r2) in zip(rec1, rec2))


# -- graph node names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PCE_PRESETS + DENSE_PRESETS)
def test_graph_node_names_are_module_paths(name):
    backbone = build_backbone(name)
    train_nodes, eval_nodes = get_graph_node_names(backbone)
    assert train_nodes == eval_nodes
    layers = [n for n, m in backbone.named_modules() if isinstance(m, (pce.PCELayer, pce.DenseLayer))]
    assert layers and all(n in eval_nodes for n in layers)  # each layer is one node named by its path
    assert not any(n.startswith(tuple(f"{l}." for l in layers)) for n in eval_nodes)  # not traced through
    assert all(any(n.startswith(f"stages.{i}.") for n in eval_nodes) for i in range(len(backbone.stages)))


def test_layers_are_call_module_nodes_of_the_real_layers():
    backbone = build_backbone("pce_tiny").eval()
    traced = torch.fx.symbolic_trace(backbone)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {f"stages.{i}.layers.0" for i in range(4)} <= calls
    for i in range(4):  # the GraphModule holds (and so calls) the very same layer objects
        assert traced.get_submodule(f"stages.{i}.layers.0") is backbone.stages[i].layers[0]
    assert set(FX_LEAF_MODULES) <= set(timm.layers.get_notrace_modules())


# -- torchvision feature extraction == eager forward_intermediates -----------------------------------------
def _check_extractor_equals_eager(backbone, name):
    fx_model = create_feature_extractor(backbone, return_nodes=_stage_nodes(backbone))
    recs = []
    for x in _inputs(name):
        eager, eager_rec = _routed(backbone, x)
        feats, fx_rec = _routed(fx_model, x)
        ref = backbone.forward_intermediates(x, list(range(len(backbone.stages))), intermediates_only=True)
        assert list(feats) == [f"c{i + 1}" for i in range(len(backbone.stages))]
        for got, want in zip(feats.values(), ref):
            assert torch.equal(got, want)
        _assert_same_routing(fx_rec, eager_rec)
        recs.append(fx_rec)
    return recs


@pytest.mark.parametrize("name", PCE_PRESETS)
def test_feature_extractor_equals_eager_every_preset(name):
    backbone = build_backbone(name).eval()
    rec1, rec2 = _check_extractor_equals_eager(backbone, name)
    assert len(rec1) == sum(len(s.layers) for s in backbone.stages)
    assert _routes_differ(rec1, rec2)  # routing follows the input at call time, it is not frozen in the graph


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_feature_extractor_equals_eager_every_execution(execution):
    backbone = build_backbone("pce_tiny", execution=execution).eval()
    rec1, rec2 = _check_extractor_equals_eager(backbone, "pce_tiny")
    assert _routes_differ(rec1, rec2)


@pytest.mark.parametrize("name", ["dense_fmnist", "dense_tiny"])
def test_feature_extractor_equals_eager_dense_twin(name):
    rec1, rec2 = _check_extractor_equals_eager(build_backbone(name).eval(), name)
    assert rec1 == rec2 == []


@pytest.mark.parametrize("name", ["pce_cifar", "pce_tiny"])
def test_classifier_feature_extractor_equals_eager(name):
    model = build_classifier(name, 10).eval()
    last = f"backbone.stages.{len(model.backbone.stages) - 1}"
    fx_model = create_feature_extractor(model, return_nodes={last: "c5", "fc": "logits"})
    recs = []
    for x in _inputs(name):
        out, rec = _routed(fx_model, x)
        _, eager_rec = _routed(model, x)
        assert torch.equal(out["c5"], model.forward_features(x))
        assert torch.equal(out["logits"], model(x))
        _assert_same_routing(rec, eager_rec)
        recs.append(rec)
    assert _routes_differ(*recs)


# -- train mode: same outputs and gradients through the traced module ----------------------------------------
@pytest.mark.parametrize("execution", ["auto", "capacity", "context", "map"])
def test_train_mode_outputs_and_gradients_equal_eager(execution):
    eager = build_classifier("pce_tiny", 10, execution=execution).train()
    fx_model = create_feature_extractor(copy.deepcopy(eager), return_nodes={"fc": "logits"}).train()
    recs = []
    for x in _inputs("pce_tiny"):
        eager.zero_grad()
        fx_model.zero_grad()
        y_eager, rec_eager = _routed(eager, x)
        y_fx, rec_fx = _routed(fx_model, x)
        assert torch.equal(y_fx["logits"], y_eager)
        _assert_same_routing(rec_fx, rec_eager)
        recs.append(rec_fx)
        (y_eager.square().mean() + pce.router_loss([r for _, r in rec_eager])).backward()
        (y_fx["logits"].square().mean() + pce.router_loss([r for _, r in rec_fx])).backward()
        fx_params = dict(fx_model.named_parameters())
        for n, p in eager.named_parameters():
            q = fx_params[n]
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert torch.allclose(p.grad, q.grad, atol=1e-6), n
        layer = fx_model.get_submodule("backbone.stages.1.layers.0")
        assert layer.router.proj.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())
    assert _routes_differ(*recs)


# -- torch.fx.symbolic_trace ----------------------------------------------------------------------------------
def test_symbolic_trace_classifier_equals_eager():
    model = build_classifier("pce_fmnist", 10).eval()
    traced = torch.fx.symbolic_trace(model)
    for x in _inputs("pce_fmnist"):
        assert torch.equal(traced(x), model(x))
    clone = copy.deepcopy(traced)  # a traced module copies like any module
    x = _inputs("pce_fmnist")[0]
    assert torch.equal(clone(x), model(x))


def test_symbolic_trace_backbone_keeps_checks():
    backbone = build_backbone("pce_tiny").eval()
    traced = torch.fx.symbolic_trace(backbone)
    x = _inputs("pce_tiny")[0]
    assert all(torch.equal(a, b) for a, b in zip(traced(x).values(), backbone(x).values()))
    with pytest.raises(ValueError, match=r"backbone expects input \[B, 3, H, W\]"):
        traced(torch.randn(1, 1, 64, 64))
    with pytest.raises(AssertionError, match="record_routing"):
        traced(x, True)


def test_a_pce_layer_cannot_be_the_root_of_a_trace():
    with pytest.raises(torch.fx.proxy.TraceError, match="trace a model that contains it"):
        torch.fx.symbolic_trace(pce.PCELayer(8, 4))


def test_attention_is_a_leaf_and_its_switch_acts_on_the_traced_model():
    cfg = pce.backbone_config("pce_tiny")
    cfg["stages"][-1]["attention"] = True
    backbone = pce.PCEBackbone(**cfg).eval()
    with torch.no_grad():
        backbone.stages[-1].attn[0].gamma.fill_(1.0)
    fx_model = create_feature_extractor(backbone, return_nodes={"stages.3": "c5"})
    assert "stages.3.attn.0" in get_graph_node_names(backbone)[1]
    x = _inputs("pce_tiny")[0]
    on = fx_model(x)["c5"]
    assert torch.equal(on, backbone(x)["stage4"])
    backbone.set_attention_enabled(False)
    off = fx_model(x)["c5"]
    assert torch.equal(off, backbone(x)["stage4"]) and not torch.equal(on, off)


# -- timm's FX feature extraction -------------------------------------------------------------------------------
def test_timm_create_feature_extractor_on_timm_model():
    model = timm.create_model("pce_tiny", num_classes=10).eval()
    fx_model = timm_feature_extractor(model, {"backbone.stages.1": "c3", "backbone.stages.3": "c5"})
    for x in _inputs("pce_tiny"):
        out = fx_model(x)
        ref = model.backbone.forward_intermediates(x, [1, 3], intermediates_only=True)
        assert torch.equal(out["c3"], ref[0]) and torch.equal(out["c5"], ref[1])


def test_timm_feature_graph_net_on_backbone():
    backbone = build_backbone("pce_tiny").eval()
    net = FeatureGraphNet(backbone, out_indices=(1, 3))
    assert net.feature_info.reduction() == [8, 32]
    x = _inputs("pce_tiny")[1]
    out = net(x)
    ref = backbone.forward_intermediates(x, [1, 3], intermediates_only=True)
    assert len(out) == 2 and all(torch.equal(a, b) for a, b in zip(out, ref))


# -- PCEConv2d (pce.convert) -----------------------------------------------------------------------------------
def test_pce_conv2d_is_a_leaf_of_every_tracer_and_registered_with_timm():
    from timm.layers import is_notrace_module

    assert pce.PCEConv2d in FX_LEAF_MODULES and is_notrace_module(pce.PCEConv2d)
    model = timm.create_model("resnet18", pretrained=False).eval()
    pce.convert(model, "layer4.*.conv2", num_experts=4, top_k=2, grid=3, noise=0.3)
    nodes = get_graph_node_names(model)[1]
    assert "layer4.0.conv2" in nodes and not any(n.startswith("layer4.0.conv2.") for n in nodes)
    fx_model = timm_feature_extractor(model, {"layer4": "c5"})
    x1, x2 = _inputs("pce_tiny")
    for x in (x1, x2 * 3):
        with pce.record_routing(model) as rec_eager:
            ref = model.forward_features(x)
        with pce.record_routing(fx_model) as rec_fx:
            out = fx_model(x)["c5"]
        assert torch.equal(out, ref)
        _assert_same_routing(rec_eager.records, rec_fx.records)
        assert [n for n, _ in rec_fx.records] == ["layer4.0.conv2", "layer4.1.conv2"]
