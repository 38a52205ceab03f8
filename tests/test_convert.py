"""pce.convert: PCEConv2d put into third-party models (timm, torchvision detection, smp) changes only its targets
and, upcycled with noise=0, computes the original model."""
import pytest
import torch
from torch import nn

import pce


def _outside(model, names):
    """State and module types of everything but the modules ``names`` (and what is inside them)."""
    inside = lambda k: any(k == n or k.startswith(n + ".") for n in names)  # noqa: E731
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not inside(k)}
    types = {k: type(m) for k, m in model.named_modules() if not inside(k)}
    return state, types


def _assert_only_targets_changed(model, before, names):
    state, types = _outside(model, names)
    assert types == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert all(isinstance(model.get_submodule(n), pce.PCEConv2d) for n in names)


@pytest.fixture
def resnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", pretrained=False).eval()


def test_timm_resnet18_layer4(resnet):
    x = torch.randn(2, 3, 128, 128)
    ref = resnet(x)
    names = ["layer4.0.conv2", "layer4.1.conv2"]
    before = _outside(resnet, names)
    model, report = pce.convert(resnet, "layer4.*.conv2", input_size=(3, 128, 128), num_experts=4, top_k=2, grid=3)
    assert model is resnet and report.names == names
    _assert_only_targets_changed(model, before, names)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    with pce.record_routing(model) as rec:
        model(x)
    assert rec.names == names and rec.results[0].weights.shape == (2, 9, 4)
    c = report.layers[0]
    assert c.in_shape == c.out_shape == (1, 512, 4, 4) and c.calls == 1
    assert c.flops_before == 4 * 4 * 512 * 512 * 9  # one 3x3 conv, batch 1
    assert c.params_before == 512 * 512 * 9 and c.params_after > 4 * c.params_before
    assert 2 * c.flops_before < c.flops_after < 3 * c.flops_before  # top-2 + the router
    assert "layer4.1.conv2" in str(report)


def test_predicates_and_lists_of_targets(resnet):
    x = torch.randn(1, 3, 64, 64)
    ref = resnet(x)
    _, report = pce.convert(resnet, [lambda n, m: m.kernel_size == (1, 1), "layer1.0.conv1"], top_k=1,
                            router="cosine", execution="context")
    assert report.names == ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0",
                            "layer1.0.conv1"]
    assert report.layers[0].flops_before is None  # no input given: no shapes, no FLOPs
    torch.testing.assert_close(resnet(x), ref, atol=1e-5, rtol=1e-4)


def test_faster_rcnn_rpn_head():
    detection = pytest.importorskip("torchvision.models.detection")
    model = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=128).eval()
    images = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        feats = list(model.backbone(model.transform(images)[0].tensors).values())
        ref = model.rpn.head(feats)
    name = "rpn.head.conv.0.0"
    before = _outside(model, [name])
    _, report = pce.convert(model, name, example_input=images, num_experts=3, top_k=2, grid=(2, 3))
    _assert_only_targets_changed(model, before, [name])
    with torch.no_grad():
        out = model.rpn.head(feats)
    for a, b in zip(out, ref):  # objectness and box deltas of every FPN level
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pce.record_routing(model) as rec, torch.no_grad():
        model(images)
    assert set(rec.names) == {name} and len(rec) == len(feats) == report.layers[0].calls  # once per level


def test_smp_fpn_segmentation_head_and_decoder_pattern():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    seg = [n for n, m in model.named_modules() if n.startswith("decoder.seg_blocks.") and type(m) is nn.Conv2d]
    before = _outside(model, ["segmentation_head.0", *seg])
    _, report = pce.convert(model, ["segmentation_head.0", "decoder.seg_blocks.*"], input_size=(3, 64, 64))
    assert report.names == ["segmentation_head.0", *seg] and len(seg) >= 4
    _assert_only_targets_changed(model, before, report.names)
    with torch.no_grad(), pce.record_routing(model) as rec:
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    assert sorted(set(rec.names)) == sorted(report.names)


@pytest.mark.parametrize("target,message", [
    ("layer9.*", r"^layer9\.\*: matches no module \(expected .*\); closest: layer"),
    ("layer4.*.bn?", r"^layer4\.\*\.bn\?: matches only BatchNorm2d modules \(expected .*\); closest: layer4"),
    ("layer4.0.bn1", r"^layer4\.0\.bn1: is a BatchNorm2d \(expected a plain nn\.Conv2d\); closest: layer4\.0\.conv1"),
    ("layer4.0.conv3", r"^layer4\.0\.conv3: no module of that name \(expected .*\); closest: layer4\.[01]\.conv[12]"),
    (lambda n, m: False, r"^<lambda>: the predicate selects no module"),
])
def test_bad_targets_raise_one_line_and_change_nothing(resnet, target, message):
    with pytest.raises(ValueError, match=message) as err:
        pce.convert(resnet, ["layer1.0.conv1", target])
    assert "\n" not in str(err.value)
    assert type(resnet.layer1[0].conv1) is nn.Conv2d  # all targets are checked before anything is replaced


def test_conv_subclasses_and_routers_are_not_targets():
    class Standardized(nn.Conv2d):  # its own forward: copying the kernel would not reproduce it
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Standardized(4, 4, 1))
    with pytest.raises(ValueError, match=r"^1: is a Standardized, an nn\.Conv2d subclass"):
        pce.convert(model, "1")
    _, report = pce.convert(model, "*")
    assert report.names == ["0"] and report.skipped == ["1"]
    with pytest.raises(ValueError, match=r"^\*: matches only .*PCEConv2d"):  # the router's convs are not targets
        pce.convert(model, "*")


def test_expert_choice_converts_with_its_flops_counted():
    """expert_choice's capacity under fvcore's torch.jit.trace (sizes arrive as tensors) used to stop the conversion
    report with an AssertionError of torch.sym_min; the counted active FLOPs exceed the plain convolution's."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model, report = pce.convert(model, "2", num_experts=4, top_k=1, grid=3, router="expert_choice",
                                input_size=(3, 32, 32))
    layer = report.layers[0]
    assert layer.flops_before == 8 * 8 * 9 * 32 * 32 and layer.flops_after > layer.flops_before
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 8, 32, 32)


def test_fvcore_counts_isolated_cells_of_uneven_grids():
    """fvcore's torch.jit.trace cannot record the cells' custom autograd Functions (uneven 11/11/10 cells of a
    3 x 3 grid on 32 px, isolated execution): they run as plain slicing under the trace, and the traced layer's
    active FLOPs equal pce.convert's analytic count."""
    from pce.models.flops import active_flops

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model, report = pce.convert(model, "2", num_experts=4, top_k=1, grid=3, router="gate", execution="isolated",
                                input_size=(3, 32, 32))
    x = torch.rand(1, 3, 32, 32)
    counted = active_flops(model.eval(), x)
    assert counted["layers"]["2"] == report.layers[0].flops_after
    out = model(x)
    out.sum().backward()  # the custom Functions still serve training outside the trace
    assert out.shape == (1, 8, 32, 32)
