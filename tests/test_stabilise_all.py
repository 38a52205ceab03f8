"""Stabilisation with every expert on every patch (issue #26): ``router_override="all_experts"`` (weights ``1/E``;
``router_override_kwargs=dict(reduce="sum")``: ``1``) in a config's phases, applied by the phase controller, against
outputs computed by hand from the experts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import pce
from pce.engine.errors import PCEError
from pce.engine.phase import PhaseError, build_phases
from pce.engine.phases import PhaseController
from pce.moe.recorder import record_routing

B, C, H, E, N = 2, 8, 8, 3, 4  # batch, channels, map side, experts, patch side (a 2 x 2 grid)


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    layer = pce.PCELayer(C, patch_size=N, num_experts=E, top_k=1, router="gate", **kw)
    model = nn.Sequential(layer).eval()
    with torch.no_grad():  # experts that differ, batch-norm statistics that are not the identity
        for p in layer.experts.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in layer.experts.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _patches(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> the 2 x 2 grid's patches ``[B * 4, C, N, N]`` (row-major), cut by hand."""
    g = H // N
    return x.reshape(B, C, g, N, g, N).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C, N, N)


def _unpatch(t: torch.Tensor) -> torch.Tensor:
    g = H // N
    return t.reshape(B, g, g, C, N, N).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, H)


def _controller(name: str) -> PhaseController:
    """``name``: ``"all_mean"`` / ``"all_sum"`` (the two forms of ``"all_experts"``) or another override."""
    entry = dict(name="stabilise", epochs=1, router_override=name)
    if name.startswith("all_"):
        entry.update(router_override="all_experts", router_override_kwargs=dict(reduce=name[4:]))
    return PhaseController(build_phases([entry, dict(name="route", epochs=-1)], 2), kmeans_init_batches=0)


@pytest.mark.parametrize("name, scale", [("all_mean", 1.0 / E), ("all_sum", 1.0)])
def test_isolated_patches_get_the_mean_or_sum_of_every_expert(name, scale):
    model = _model(execution="sparse")
    layer = model[0]
    x = torch.randn(B, C, H, H)
    ctl = _controller(name)
    ctl.on_epoch_start(0, [model])
    with torch.no_grad(), record_routing(model) as rec:
        out = model(x)
        tokens = _patches(x)
        mix = sum(layer.experts.forward_one(tokens, e) for e in range(E)) * scale
        expected = x + layer.proj(_unpatch(mix))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    w = rec.results[0].weights
    assert (w == scale).all() and w.shape == (B, (H // N) ** 2, E)  # every patch, every expert
    ctl.on_epoch_start(1, [model])  # the learned top-1 router again
    assert layer.router_override is None
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    assert ((rec.results[0].weights > 0).sum(-1) <= 1).all()  # top-1 (the gate may drop a patch)


def test_in_training_mode_too_unlike_uniform_with_top1():
    model = _model(execution="sparse").train()
    x = torch.randn(B, C, H, H)
    for name, per_patch in (("all_mean", E), ("uniform", 1)):  # uniform inherits top_k=1: one random expert
        _controller(name).on_epoch_start(0, [model])
        with record_routing(model) as rec:
            model(x)
        assert ((rec.results[0].weights > 0).sum(-1) == per_patch).all(), name


@pytest.mark.parametrize("name, scale", [("all_mean", 1.0 / E), ("all_sum", 1.0)])
def test_context_layers_run_every_expert_on_the_whole_map_and_get_context_back(name, scale):
    model = _model(execution="context")
    layer = model[0]
    x = torch.randn(B, C, H, H)
    ctl = _controller(name)
    ctl.on_epoch_start(0, [model])
    assert layer.execution == "map"
    with torch.no_grad():
        out = model(x)
        # context execution reads across patch borders: every expert on the whole map, then the mean / sum
        expected = x + layer.proj(sum(layer.experts.forward_one(x, e) for e in range(E)) * scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    ctl.on_epoch_start(1, [model])
    assert layer.execution == "context" and layer.router_override is None


def test_context_with_layer_statistics_is_refused_naming_the_phase():
    model = _model(execution="context", norm_stats="layer")
    with pytest.raises(PCEError, match=r"phases\.0\.router_override"):
        _controller("all_sum").on_epoch_start(0, [model])


def test_phase_entries_and_their_errors():
    phases = build_phases([dict(epochs=1, router_override="all_experts"), dict(epochs=-1)], 3)
    assert phases[0].router_override_kwargs is None and phases[1].epochs == 2
    assert "reduce" not in phases[0].describe()
    summed = build_phases([dict(epochs=1, router_override="all_experts", router_override_kwargs=dict(reduce="sum"))], 1)
    assert "'reduce': 'sum'" in summed[0].describe()
    with pytest.raises(PhaseError, match="must be one of") as e:
        build_phases([dict(epochs=1, router_override="all_max")], 1)
    for bad in (dict(router_override="all_experts", router_override_kwargs=dict(reduce="max")),  # not a reduction
                dict(router_override="all_experts", router_override_kwargs="sum"),             # not a dict
                dict(router_override_kwargs=dict(reduce="sum"))):                               # no override
        with pytest.raises(PhaseError) as e:
            build_phases([dict(epochs=1, **bad)], 1)
        assert e.value.key == "router_override_kwargs"


def test_a_config_file_reaches_the_phase(tmp_path):
    from pce.engine import load_config

    cfg_file = tmp_path / "stabilise_sum.py"
    cfg_file.write_text('_base_ = ["%s"]\nphases = [dict(name="stabilise", epochs=1, router_override="all_experts", '
                        'router_override_kwargs=dict(reduce="sum")), dict(name="route", epochs=-1)]\n'
                        % (Path(__file__).resolve().parents[1] / "configs" / "demo_cls_digits.py").as_posix())
    cfg = load_config(str(cfg_file))
    phase = build_phases(cfg.phases, cfg.schedule.epochs)[0]
    assert phase.router_override == "all_experts" and dict(phase.router_override_kwargs) == {"reduce": "sum"}
