"""The contracts smp's own test suites check on an encoder and on the models built on it (tests/encoders/base.py,
tests/models/base.py of segmentation_models.pytorch), checked here on the PCE encoders: input channels, depths,
output strides, every architecture, the capability flags and what they promise (torch.compile / torch.export
per execution mode, context included; TorchScript refused). Complements tests/test_segmentation_model.py
(wrapper, sizes, routing).
"""
import inspect

import pytest
import torch

import segmentation_models_pytorch as smp

from pce.moe.execution import build_execution
from pce.moe.recorder import record_routing
from pce.tasks.segmentation import PCEEncoder, create_smp_model, register_smp_encoder

NOMINAL_STRIDES = [1, 2, 4, 8, 16, 32]
# A small pce_tiny: 2 experts, top-1, narrow stages (cheap graph captures).
MICRO = dict(stem_channels=8, num_experts=2, top_k=1, stages=[
    dict(channels=8, depth=1, patch_size=4, stride=1), dict(channels=8, depth=1, patch_size=4, stride=2),
    dict(channels=16, depth=1, patch_size=2, stride=2), dict(channels=16, depth=1, patch_size=2, stride=2)])
# Every capturable execution mode, four per encoder (one per stage), so that two captures cover them all.
MIXED = [("sparse", "dense", "fused", "map"), ("reference", "auto", "capacity", "sparse")]


def measured_strides(x, feats):
    return [x.shape[2] // f.shape[2] for f in feats], [x.shape[3] // f.shape[3] for f in feats]


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_encoder_in_channels_forward_backward(in_channels):
    enc = smp.encoders.get_encoder("pce_tiny", in_channels=in_channels, weights=None)
    feats = enc(torch.rand(1, in_channels, 64, 64))
    assert len(feats) == 6 and feats[0].shape[1] == in_channels == enc.out_channels[0]
    feats[-1].mean().backward()
    assert enc.backbone.stem[0][0].weight.grad is not None


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_encoder_depth(depth):
    enc = smp.encoders.get_encoder("pce_tiny", in_channels=3, weights=None, depth=depth).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = enc(x)
    assert len(feats) == depth + 1 == len(enc.out_channels)
    assert measured_strides(x, feats) == (NOMINAL_STRIDES[:depth + 1],) * 2
    assert enc.output_stride == NOMINAL_STRIDES[depth]
    assert [f.shape[1] for f in feats] == enc.out_channels


@pytest.mark.parametrize("output_stride", [8, 16])
def test_encoder_output_stride(output_stride):
    enc = smp.encoders.get_encoder("pce_tiny", in_channels=3, weights=None, output_stride=output_stride).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        hs, ws = measured_strides(x, enc(x))
    assert hs == ws == [min(output_stride, s) for s in NOMINAL_STRIDES]
    assert enc.output_stride == output_stride


@pytest.mark.parametrize("arch", sorted(smp.MODEL_ARCHITECTURES_MAPPING))
def test_every_architecture(arch):
    """Every smp architecture on a PCE encoder: default depth (PAN needs 128 px at its output stride 16), then
    in_channels=1, depth 3, 7 classes as smp's model tests build it; DPT refuses with smp's own clear error."""
    if arch == "dpt":
        with pytest.raises(ValueError, match="Only Timm encoders"):
            smp.create_model(arch, encoder_name="pce_tiny", encoder_weights=None)
        return
    size = 128 if arch == "pan" else 64
    net = smp.create_model(arch, encoder_name="pce_tiny", encoder_weights=None).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, size, size)).shape == (1, 1, size, size)
    cls = smp.MODEL_ARCHITECTURES_MAPPING[arch]
    kw = {}
    if arch in ("unet", "unetplusplus", "manet"):
        kw["decoder_channels"] = inspect.signature(cls).parameters["decoder_channels"].default[:3]
    net = smp.create_model(arch, encoder_name="pce_tiny", encoder_weights=None, encoder_depth=3, in_channels=1,
                           classes=7, **kw).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 64, 64))
    # smp's FPN decoder assumes maps at strides 4..32 whatever the encoder (resnet18 too): 4x larger at depth 3
    assert out.shape == ((1, 7, 256, 256) if arch == "fpn" else (1, 7, 64, 64))


def test_classification_head():
    net = smp.create_model("FPN", encoder_name="pce_tiny", encoder_weights=None,
                           aux_params=dict(pooling="avg", classes=10, dropout=0.5, activation="sigmoid")).eval()
    with torch.no_grad():
        masks, labels = net(torch.rand(1, 3, 64, 64))
    assert masks.shape == (1, 1, 64, 64) and labels.shape == (1, 10)


# -- capability flags and the captures they promise ------------------------------------------------------------
def micro_fpn(executions):
    """An FPN on the MICRO encoder whose four PCE layers run ``executions`` (one per stage)."""
    name = register_smp_encoder("pce_micro_contract", "pce_tiny", **MICRO)
    net = create_smp_model("FPN", name, classes=2, decoder_pyramid_channels=16,
                           decoder_segmentation_channels=32).eval()
    layers = list(net.encoder.backbone.pce_layers())
    assert len(layers) == len(executions)
    for layer, ex in zip(layers, executions):  # one strategy per stage (the backbone option sets them all)
        layer.strategy, layer.execution = build_execution(ex, layer.options), ex
    return net


def two_routings(net):
    """Two inputs ``[1, 3, 64, 64]`` that route differently, and the eager logits."""
    xs = [torch.rand(1, 3, 64, 64), torch.randn(1, 3, 64, 64) * 3]
    with torch.no_grad(), record_routing(net) as rec:
        eager = [net(x) for x in xs]
    w = [r.weights.argmax(-1) for r in rec.results]
    assert any(not torch.equal(a, b) for a, b in zip(w[:4], w[4:])), "inputs must route differently"
    return xs, eager


@pytest.mark.parametrize("executions", MIXED, ids=["-".join(m) for m in MIXED])
def test_flags_true_and_captures_equal_eager(executions):
    """torch.compile (fullgraph, backend "eager": dynamo's graph capture without inductor's code generation)
    and torch.export of the whole FPN give the eager logits on two inputs routed differently."""
    net = micro_fpn(executions)
    assert net.encoder._is_torch_compilable and net.encoder._is_torch_exportable
    assert net._is_torch_compilable and net._is_torch_exportable
    assert not net.encoder._is_torch_scriptable and not net._is_torch_scriptable
    xs, eager = two_routings(net)
    torch.compiler.reset()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    exported = torch.export.export(net, (torch.rand(1, 3, 64, 64),)).module()
    with torch.no_grad():
        for x, e in zip(xs, eager):
            assert (compiled(x) - e).abs().max() < 1e-5
            assert (exported(x) - e).abs().max() < 1e-5


def test_context_flags_true_and_captures_equal_eager():
    """Context execution (the segmentation and Camelyon configs') captures in its static whole-map form: flags
    True, and torch.compile / torch.export of the FPN give the eager logits on two inputs routed differently."""
    net = create_smp_model("FPN", "pce_tiny", {**MICRO, "execution": "context"}, classes=2,
                           decoder_pyramid_channels=16, decoder_segmentation_channels=32).eval()
    assert all(layer.execution == "context" for layer in net.encoder.backbone.pce_layers())
    assert net.encoder._is_torch_compilable and net.encoder._is_torch_exportable
    assert net._is_torch_compilable and net._is_torch_exportable
    xs, eager = two_routings(net)
    torch.compiler.reset()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    exported = torch.export.export(net, (torch.rand(1, 3, 64, 64),)).module()
    with torch.no_grad():
        for x, e in zip(xs, eager):
            assert (compiled(x) - e).abs().max() < 1e-5
            assert (exported(x) - e).abs().max() < 1e-5


def test_flags_follow_the_layers():
    """The encoder's flags are properties: one context layer whose router gives patches two experts (refused in
    eager runs too) turns them off, and the captures they advertise do fail."""
    enc = PCEEncoder("pce_tiny", **MICRO).eval()
    assert enc._is_torch_exportable and enc._is_torch_compilable
    layer = list(enc.backbone.pce_layers())[-1]
    layer.strategy = build_execution("context", layer.options)
    assert enc._is_torch_exportable and enc._is_torch_compilable  # top-1 context captures
    layer.router.top_k = 2
    assert not enc._is_torch_exportable and not enc._is_torch_compilable
    x = torch.rand(1, 3, 64, 64)
    torch.compiler.reset()
    with pytest.raises(RuntimeError):  # dynamo's Unsupported (a RuntimeError) around the layer's own error
        torch.compile(enc, fullgraph=True, backend="eager")(x)
    with pytest.raises(RuntimeError, match="execution='context' needs at most one expert per patch"):
        torch.export.export(enc, (x,))


def test_torchscript_raises_clear_error():
    enc = PCEEncoder("pce_tiny", **MICRO)
    assert not enc._is_torch_scriptable
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(enc)
