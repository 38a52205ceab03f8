"""The routing recorder: the one channel by which routing leaves any model with PCE layers."""
import copy
import pickle

import pytest
import torch

import pce
from pce.models.classifier import build_classifier
from pce.tasks.detection.model import build_detector
from pce.tasks.segmentation import build_segmentation_model

SMALL_DET = dict(num_classes=3, fpn_channels=16, representation_size=32, min_size=64, max_size=64)


def _backbone():
    return pce.build_backbone("pce_tiny", num_experts=3), torch.randn(2, 3, 64, 64)


def _classifier():
    return build_classifier("pce_fmnist", 4, num_experts=2), torch.randn(2, 1, 28, 28)


def _detector():
    return build_detector("pce_tiny", **SMALL_DET), [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]


def _smp_fpn():
    return build_segmentation_model("FPN", "pce_tiny", num_classes=3), torch.randn(2, 3, 64, 64)


KINDS = {"backbone": _backbone, "classifier": _classifier, "detector": _detector, "smp_fpn": _smp_fpn}


def _expected_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, pce.PCELayer)]


def _run(model, x, **kw):
    with pce.record_routing(model, **kw) as rec:
        model(x)
    return rec


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_records_every_layer_in_forward_order(kind, mode):
    torch.manual_seed(0)
    model, x = KINDS[kind]()
    model.train(mode == "train")
    if mode == "eval_no_grad":
        with torch.no_grad():
            rec = _run(model, x)
    else:
        rec = _run(model, x) if kind != "detector" else None
        if rec is None:  # torchvision detectors need targets in training
            tgt = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
            with pce.record_routing(model) as rec:
                model(x, tgt)
    names = _expected_names(model)
    assert rec.names == names and len(names) > 0
    for (name, r), layer in zip(rec.records, (dict(model.named_modules())[n] for n in names)):
        B = 2
        assert r.weights.shape == (B, r.grid[0] * r.grid[1], layer.num_experts)
        assert r.patch_size is not None and r.patch_size <= layer.patch_size
        assert (r.weights.sum(-1) <= 1 + 1e-5).all()
        assert r.weights.requires_grad == (mode == "train")
    if mode == "train":  # the recorded results carry the graph: the router loss reaches the routers
        loss = pce.router_loss(rec.results)
        loss.backward()
        router = dict(model.named_modules())[names[0]].router
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_nothing_is_kept_between_calls_and_copies_are_clean():
    model, x = _backbone()
    rec = _run(model, x)
    assert len(rec) == 4
    out = model(x)  # outside the block: nothing is recorded, nothing is stored on the modules
    assert len(rec) == 4 and isinstance(out, dict)
    for m in model.modules():
        for v in vars(m).values():
            assert not isinstance(v, pce.RoutingResult)
    with pce.record_routing(model) as live:
        clone = copy.deepcopy(model)  # a copy made inside a block does not report to it
        blob = pickle.dumps(model)
        model(x)
    clone(x)
    pickle.loads(blob)(x)
    assert len(live) == 4
    assert len(_run(clone, x)) == 4  # the copy has its own, working routing channel


def test_recorders_nest_and_detach():
    model, x = _backbone()
    with pce.record_routing(model) as outer:
        with pce.record_routing(model, detach=True) as inner:
            model(x)
        model(x)
    assert len(inner) == 4 and len(outer) == 8
    assert not inner.results[0].weights.requires_grad and outer.results[0].weights.requires_grad
    assert torch.equal(inner.results[0].weights, outer.results[0].weights.detach())
    assert list(inner.by_layer()) == _expected_names(model)


def test_dense_twin_records_nothing_and_names_strip_wrappers():
    dense = pce.build_backbone("dense_tiny")
    assert _run(dense, torch.randn(1, 3, 64, 64)).records == []
    model, x = _backbone()
    wrapped = torch.optim.swa_utils.AveragedModel(model)  # an EMA wrapper: module.<path>
    rec = _run(wrapped, x)
    assert rec.names == _expected_names(model)


def test_backbone_return_routing_is_the_recorder():
    model, x = _backbone()
    torch.manual_seed(3)
    model.eval()
    feats, routing = model(x, return_routing=True)
    rec = _run(model, x)
    assert len(routing) == len(rec) == 4
    for a, b in zip(routing, rec.results):
        assert torch.equal(a.weights, b.weights)
