"""Causal tests of routing (issue #26): forcing one expert and shuffling the routing, against outputs computed by
hand from the experts and the recorded routing; copies after upcycling show no change, perturbed experts do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pce
from pce.analysis.causal import causal_summary, causal_table, output_change, routing_intervention
from pce.models.classifier import build_classifier
from pce.models.routed import routed_layers, set_router_override, upcycle_experts
from pce.moe.recorder import record_routing

B, C, H, N, E = 2, 4, 8, 4, 3  # batch, channels, map side, patch side (2 x 2 grid), experts


SOFT = dict(router="gate", router_kwargs={"top_k": None, "capacity_factor": None})  # every expert, weights sum to 1


def _layer(**kw) -> pce.PCELayer:
    torch.manual_seed(0)
    return pce.PCELayer(C, patch_size=N, num_experts=E, execution="sparse", **kw).eval()


def _by_hand(layer: pce.PCELayer, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x + proj(sum_e w[b, p, e] * expert_e(patch))`` with patches cut by hand (row-major 2 x 2 grid)."""
    g = H // N
    tokens = x.reshape(B, C, g, N, g, N).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C, N, N)
    w = weights.reshape(B * g * g, E)
    mix = sum(layer.experts.forward_one(tokens, e) * w[:, e, None, None, None] for e in range(E))
    mix = mix.reshape(B, g, g, C, N, N).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, H)
    return x + layer.proj(mix)


@torch.no_grad()
def test_forcing_an_expert_equals_that_expert_by_hand():
    layer = _layer(**SOFT)
    x = torch.randn(B, C, H, H)
    for e in range(E):
        with routing_intervention(layer, "force", expert=e) as names, record_routing(layer) as rec:
            out = layer(x)
        assert names == [""]
        onehot = torch.zeros(B, 4, E)
        onehot[..., e] = 1.0
        torch.testing.assert_close(rec.results[0].weights, onehot)
        torch.testing.assert_close(out, _by_hand(layer, x, onehot), rtol=1e-5, atol=1e-5)
    assert layer.router_override is None


@torch.no_grad()
def test_shuffling_permutes_the_routed_patches_with_the_seeded_generator():
    layer = _layer(**SOFT)
    x = torch.randn(B, C, H, H)
    with record_routing(layer) as rec:
        layer(x)
    routed = rec.results[0].weights.reshape(B * 4, E)
    perm = torch.randperm(B * 4, generator=torch.Generator().manual_seed(7))  # all patches routed here
    with routing_intervention(layer, "shuffle", seed=7), record_routing(layer) as rec:
        out = layer(x)
    shuffled = rec.results[0].weights
    torch.testing.assert_close(shuffled.reshape(B * 4, E), routed[perm])
    torch.testing.assert_close(out, _by_hand(layer, x, shuffled), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_dropped_patches_stay_dropped_and_the_mass_is_kept():
    layer = _layer(router="gate", top_k=1, router_kwargs={"capacity_factor": 0.5})  # ceil(0.5 * 8 / 3) = 2 each
    x = torch.randn(B, C, H, H)
    with record_routing(layer) as rec:
        layer(x)
    w = rec.results[0].weights
    mass = w.sum(-1)
    assert (mass == 0).any() and (mass > 0).any()
    for kind in ("shuffle", "force"):
        with routing_intervention(layer, kind, expert=2), record_routing(layer) as rec:
            layer(x)
        torch.testing.assert_close(rec.results[0].weights.sum(-1), mass)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("pce_fmnist", 10, in_chans=1, num_experts=E, router="cosine", execution="sparse").eval()


@torch.no_grad()
def test_copies_after_upcycling_show_no_change_and_perturbed_experts_do():
    net = _classifier()
    upcycle_experts(net, 0)
    x = [torch.randn(4, 1, 28, 28), torch.randn(3, 1, 28, 28)]
    routed = net(x[0])
    for e in range(E):
        with routing_intervention(net, "force", expert=e):
            torch.testing.assert_close(net(x[0]), routed, rtol=1e-5, atol=1e-6)
    table = causal_table(net, x)
    assert [r["intervention"] for r in table] == ["routed", "expert 0", "expert 1", "expert 2", "shuffled"]
    assert all(r["rel_change"] < 1e-5 and r["top1_agreement"] == 1.0 for r in table)
    assert causal_summary(table)["forced_change_max"] < 1e-5
    for _, layer in routed_layers(net):  # experts 1 and 2 no longer copies of expert 0
        for m in layer.experts.modules():
            if hasattr(m, "weights"):
                for w in list(m.weights)[1:]:
                    w.add_(0.2 * w.std() * torch.randn_like(w))
    table = causal_table(net, x)
    s = causal_summary(table)
    assert s["forced_change_max"] > 1e-3 and s["shuffled_change"] > 1e-4
    assert table[1]["rel_change"] > 1e-3  # expert 0 alone differs from the routed mixture of distinct experts
    assert table[1]["layers"] == 3 and table[0]["rel_change"] == 0.0


@torch.no_grad()
def test_overrides_are_restored_and_nothing_enters_the_state_dict():
    net = _classifier()
    keys = list(net.state_dict())
    set_router_override(net, "uniform")
    with routing_intervention(net, "shuffle"):
        assert list(net.state_dict()) == keys and sum(1 for _ in net.parameters()) == len(list(net.parameters()))
        assert all(type(layer.router_override).__name__ == "_Intervention" for _, layer in routed_layers(net))
    assert all(type(layer.router_override).__name__ == "UniformRouter" for _, layer in routed_layers(net))
    x = [torch.randn(3, 1, 28, 28)]
    assert causal_table(net, x, seed=1) == causal_table(net, x, seed=1)  # seeded


def test_bad_arguments_and_output_change_by_hand():
    net = _classifier()
    with pytest.raises(ValueError, match="intervention"):
        with routing_intervention(net, "swap"):
            pass
    with pytest.raises(ValueError, match="no routed layer"):
        with routing_intervention(net, "force", layers=["backbone.nope"]):
            pass
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 3.0], [0.0, 2.0]])  # the first row's arg-max changes
    c = output_change((a,), (b,))
    assert c["rel_change"] == pytest.approx(3.0 / 5 ** 0.5) and c["top1_agreement"] == 0.5
    assert c["max_abs_change"] == 3.0
    c = output_change(a, b)  # a bare tensor of logits
    assert c["top1_agreement"] == 0.5 and c["rel_change"] == pytest.approx(3.0 / 5 ** 0.5)
    c = output_change([{"boxes": a}], [{"boxes": b}])  # a detector's dicts: no arg-max of boxes
    assert c["top1_agreement"] is None and c["rel_change"] == pytest.approx(3.0 / 5 ** 0.5)


def test_report_section_and_markdown_hold_both_tables():
    from pce.analysis.report import experts_markdown, experts_section
    from pce.analysis.runner import expert_analysis

    net = _classifier()
    upcycle_experts(net, 0)
    analysis = expert_analysis(net, [torch.randn(2, 1, 28, 28)])
    heading, text, images = experts_section(analysis)
    assert "diversity" in heading and images == [] and text.count("<table>") == 2
    assert text.count("<tr>") == 1 + 3 + 1 + 5  # header + 3 layers, header + routed / 3 experts / shuffled
    md = experts_markdown(analysis)
    assert "| backbone.stages.0.layers.0 | 3 | 1.0000 |" in md and "| shuffled | 3 | 0.0000 | 1.0000 |" in md
    assert analysis["summary"]["expert_weight_cos_min"] == pytest.approx(1.0, abs=1e-9)


def test_the_tool_prints_writes_json_and_refuses_to_overwrite(tmp_path, capsys):
    import json
    from pathlib import Path

    from _faults_util import load_tool
    from pce.engine import Trainer, load_config
    from pce.engine.errors import run_cli
    from pce.tasks import get_task

    demo = str(Path(__file__).resolve().parents[1] / "configs/demo_cls_digits.py")
    cfg = load_config(demo, [("runtime.work_dir", str(tmp_path / "run")), ("schedule.epochs", 2),
                             ("schedule.iters_per_epoch", 1), ("phases.0.epochs", 1), ("phases.1.epochs", 1),
                             ("runtime.kmeans_init_batches", 1), ("runtime.tensorboard", False),
                             ("runtime.progress_bar", False)])
    Trainer(cfg, get_task("classification")).train()
    tool = load_tool("analyze_experts")
    out = tmp_path / "experts.json"
    argv = [demo, "--checkpoint", str(tmp_path / "run" / "latest.pth"), "--num", "16", "--out", str(out)]
    args = tool.parse_args(argv)
    assert run_cli(lambda: tool.main(args), debug=False) == 0
    printed = capsys.readouterr().out
    assert "backbone.stages.2.layers.0" in printed and "shuffled" in printed
    got = json.loads(out.read_text())
    assert got["num_samples"] == 16 and len(got["diversity"]) == 3
    assert [r["intervention"] for r in got["causal"]] == ["routed", "expert 0", "expert 1", "expert 2", "expert 3",
                                                          "shuffled"]
    assert all(r["top1"] is not None for r in got["causal"])
    assert got["summary"]["top1_routed"] == got["causal"][0]["top1"]
    assert not list(tmp_path.glob(".experts.json*"))  # no temp file left
    args = tool.parse_args(argv)
    assert run_cli(lambda: tool.main(args), debug=False) == 1  # exists: refused without --force
    assert "already exists" in capsys.readouterr().err


@torch.no_grad()
def test_forcing_ignores_the_capacity_of_a_load_balanced_router():
    """A forced expert receives every routed patch: under capacity execution (gate's default capacity factor 1.25)
    its ~N/E slots must not drop the rest, so exact copies still show no change (review of issue #26)."""
    torch.manual_seed(0)
    model = pce.build_backbone("pce_tiny", router="gate", execution="capacity").eval()
    upcycle_experts(model, 0)
    x = torch.randn(2, 3, 256, 256)
    rows = causal_table(model, [x])
    forced = [r for r in rows if str(r["intervention"]).startswith("expert ")]
    assert forced and all(r["rel_change"] == pytest.approx(0.0, abs=1e-6) for r in forced)


def test_model_inputs_give_detectors_their_raw_images():
    """The analysis tools feed ``model(...)`` what it takes: a detector its list of raw images (it normalises them
    itself; feeding the task's normalised batch_images would normalise twice), other tasks their image tensor."""
    from pce.tasks import get_task
    from pce.tasks.tooling import model_inputs

    raw = [torch.rand(3, 40, 50), torch.rand(3, 30, 30)]
    got = model_inputs(get_task("detection"), (raw, [{}, {}]))
    assert isinstance(got, list) and len(got) == 2 and all(a is b for a, b in zip(got, raw))
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    cls = get_task("classification")
    assert torch.equal(model_inputs(cls, (x, y)), cls.batch_images((x, y)))
