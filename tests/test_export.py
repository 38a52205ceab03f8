"""Static-shape execution for captured graphs: ``execution="capacity"`` equals the eager sparse path (``"context"``:
tests/test_context_execution.py), and torch.export / jit.trace keep routing input-dependent (two inputs through the captured model match eager); what
tools/export.py captures of a task's model (``task.export_target``, :mod:`pce.tasks.export_targets`)."""
from pathlib import Path

import pytest
import torch

from pce.models.classifier import build_classifier
from pce.models.layer import PCELayer
from pce.moe.dispatch import dispatch_capacity, dispatch_sparse
from pce.moe.experts import build_expert_bank
from pce.moe.recorder import record_routing
from pce.moe.routing import capacity_mask

REPO = Path(__file__).resolve().parents[1]


def _pair(**kw):
    torch.manual_seed(0)
    a = PCELayer(8, 4, num_experts=4, execution="sparse", **kw).eval()
    b = PCELayer(8, 4, num_experts=4, execution="capacity", **kw).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=2),
                                dict(router="gate", top_k=1, router_kwargs=dict(capacity_factor=1.0))])
def test_capacity_equals_sparse_without_overflow(kw):
    a, b = _pair(**kw)
    x = torch.randn(3, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_capacity_drops_lowest_weights_on_overflow():
    torch.manual_seed(0)
    bank = build_expert_bank("residual", 3, 4, 4).eval()
    tokens, w = torch.randn(10, 4, 3, 3), torch.rand(10, 3)
    keep = capacity_mask(torch.ones_like(w, dtype=torch.bool), w, 4)  # independent: 4 largest per expert
    with torch.no_grad():
        assert torch.allclose(dispatch_capacity(bank, tokens, w, 4), dispatch_sparse(bank, tokens, w * keep),
                              atol=1e-5)


@pytest.fixture(scope="module")
def classifier_and_inputs():
    torch.manual_seed(0)
    m = build_classifier("pce_fmnist", 10).eval()
    xs = [torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28) * 2 + 1]
    with torch.no_grad(), record_routing(m) as rec:
        eager = [m(x) for x in xs]
    w = [r.weights.argmax(-1) for r in rec.results]
    n = len(w) // 2
    assert any(not torch.equal(w[i], w[i + n]) for i in range(n)), "inputs must route differently"
    return m, xs, eager


def test_torch_export_keeps_routing(classifier_and_inputs):
    m, xs, eager = classifier_and_inputs
    ep = torch.export.export(m, (xs[0],)).module()
    with torch.no_grad():
        for x, e in zip(xs, eager):
            assert torch.allclose(ep(x), e, atol=1e-5)


def test_jit_trace_keeps_routing(classifier_and_inputs):
    m, xs, eager = classifier_and_inputs
    with torch.no_grad():
        tr = torch.jit.trace(m, (xs[0],), check_trace=False)
        for x, e in zip(xs, eager):
            assert torch.allclose(tr(x), e, atol=1e-5)


def test_jit_script_raises_clear_error(classifier_and_inputs):
    with pytest.raises(RuntimeError, match="torch.jit.script"):
        torch.jit.script(classifier_and_inputs[0])


def test_context_execution_jit_trace_keeps_routing():
    """Context execution traces (its static whole-map form) and gives the eager outputs on an input routed
    differently from the example; only a router giving patches several experts (refused eagerly too) is refused,
    and pce.models.fuse.capture_blockers lists exactly that layer."""
    from pce.models.fuse import capture_blockers

    torch.manual_seed(0)
    layer = PCELayer(8, 4, num_experts=3, top_k=1, execution="context").eval()
    xs = [torch.randn(1, 8, 12, 12), torch.rand(1, 8, 12, 12) * 4 - 1]
    with torch.no_grad(), record_routing(layer) as rec:
        eager = [layer(x) for x in xs]
    assert not torch.equal(rec.results[0].weights.argmax(-1), rec.results[1].weights.argmax(-1))
    assert capture_blockers(layer) == []
    with torch.no_grad():
        tr = torch.jit.trace(layer, (xs[0],), check_trace=False)
        for x, e in zip(xs, eager):
            assert torch.allclose(tr(x), e, atol=1e-5)

    two = PCELayer(8, 4, num_experts=3, top_k=2, execution="context").eval()
    assert [n for n, _ in capture_blockers(two)] == [""]
    with pytest.raises(RuntimeError, match="execution='context' needs at most one expert per patch"):
        torch.jit.trace(two, (xs[0],), check_trace=False)


def test_onnx_round_trip_keeps_routing(classifier_and_inputs, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m, xs, eager = classifier_and_inputs
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (xs[0],), str(path), dynamo=True, verbose=False)
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for x, e in zip(xs, eager):
        assert abs(sess.run(None, {name: x.numpy()})[0] - e.numpy()).max() < 1e-4


# -- smp FPN on a PCE encoder (default routing: cosine top-1, execution "auto") --------------------------------
@pytest.fixture(scope="module")
def fpn_and_inputs():
    """An FPN on ``pce_tiny`` (small decoder), two inputs ``[2, 3, 64, 64]`` that route differently, the eager
    logits ``[2, 3, 64, 64]`` and the torch.export program captured on a third input."""
    from pce.tasks.segmentation import build_segmentation_model

    torch.manual_seed(0)
    m = build_segmentation_model("FPN", "pce_tiny", num_classes=3, decoder_pyramid_channels=32,
                                 decoder_segmentation_channels=32).eval()
    xs = [torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64) * 4 - 1]
    with torch.no_grad(), record_routing(m) as rec:
        eager = [m(x) for x in xs]
    w = [r.weights.argmax(-1) for r in rec.results]
    n = len(w) // 2
    assert n == 4 and any(not torch.equal(w[i], w[i + n]) for i in range(n)), "inputs must route differently"
    with torch.no_grad():
        ep = torch.export.export(m, (torch.randn(2, 3, 64, 64),))
    return m, xs, eager, ep


def test_fpn_torch_export_keeps_routing(fpn_and_inputs):
    _, xs, eager, ep = fpn_and_inputs
    with torch.no_grad():
        for x, e in zip(xs, eager):
            assert (ep.module()(x) - e).abs().max() < 1e-4


def test_fpn_onnx_round_trip_keeps_routing(fpn_and_inputs, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, xs, eager, ep = fpn_and_inputs
    path = tmp_path / "fpn.onnx"
    torch.onnx.export(ep, f=str(path), dynamo=True, verbose=False)  # the captured program, converted
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for x, e in zip(xs, eager):
        assert abs(sess.run(None, {name: x.numpy()})[0] - e.numpy()).max() < 1e-4


# -- what tools/export.py captures of a task's model (pce.tasks.export_targets, via task.export_target) -----------
def test_image_export_target_normalises_with_the_eval_transform():
    from pce.engine import load_config
    from pce.engine.phases import find_backbones
    from pce.tasks import get_task
    from pce.tasks.export_targets import image_export_target, random_images

    cfg = load_config(REPO / "configs/demo_cls_digits.py")
    task = get_task(cfg.task)
    model = task.build_model(cfg).eval()
    module, make_input, info = task.export_target(model, cfg, "model", (16, 16))
    assert module is model and info["mean"] == [0.305] and info["std"] == [0.319] and info["input"] == "normalised"
    x = make_input(3, 1)
    assert x.shape == (3, 1, 16, 16) and torch.equal(x, make_input(3, 1))  # reproducible per seed
    assert torch.allclose(x, (random_images(cfg, (16, 16))(3, 1) - 0.305) / 0.319)
    assert not torch.equal(x, make_input(3, 2))
    backbone, _, info = image_export_target(model, cfg, "backbone", (16, 16))
    assert backbone is find_backbones(model)[0] and "(the backbone)" in info["exported"]


def test_detection_export_target_backbone_takes_the_preprocessed_batch():
    from pce.engine import load_config
    from pce.tasks import get_task

    cfg = load_config(REPO / "configs/demo_det_pce.py")
    task = get_task(cfg.task)
    model = task.build_model(cfg).eval()
    module, make_input, info = task.export_target(model, cfg, "backbone", (64, 80))
    x = make_input(2, 0)
    assert module is model.pce_backbone and info["input"] == "preprocessed"
    assert x.shape[:2] == (2, 3) and all(s % model.size_divisibility == 0 for s in x.shape[-2:])
    assert info["mean"] == list(model.transform.image_mean)
