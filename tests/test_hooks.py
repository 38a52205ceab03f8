"""Trainer hooks: the order of the events, metrics a hook adds to the logs, cleanup after a failure, and the
routing-statistics hook against :mod:`pce.analysis.stats` computed by hand on a fixed routing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pce.analysis import stats as S
from pce.engine import HookBase, Trainer
from pce.moe.recorder import RoutingSource
from pce.moe.routing import RoutingResult
from pce.tasks import get_task
from pce.tasks.hooks import RoutingStatsHook, SplitRecordHook, default_hooks, routing_log_stats

from _faults_util import tiny_cfg

# the keys the training logs have always carried per layer (tools/report.py, docs)
LOGGED = ["entropy", "usage", "mean_weight", "dropped_fraction", "collapsed_experts", "usage_entropy", "imbalance",
          "nmi_position", "nmi_position_baseline", "nmi_class", "nmi_class_baseline"]


class Recorder(HookBase):
    def __init__(self, events):
        self.events = events

    def before_train(self):
        self.events.append(("before_train", self.trainer.epoch))

    def before_epoch(self):
        self.events.append(("before_epoch", self.trainer.epoch))

    def before_step(self):
        assert self.trainer.batch is not None
        self.events.append(("before_step", self.trainer.iteration, self.trainer.logging_step))

    def log_metrics(self):
        self.events.append(("log_metrics", self.trainer.iteration))
        return {"hook_value": float(self.trainer.iteration)}

    def after_step(self):
        self.events.append(("after_step", self.trainer.iteration))

    def after_epoch(self):
        self.events.append(("after_epoch", self.trainer.epoch))

    def after_train(self):
        self.events.append(("after_train", self.trainer.epoch))


def test_hook_events_in_order_and_metrics_logged(tmp_path: Path):
    events, calls = [], []
    cfg = tiny_cfg(tmp_path, ("runtime.log_interval", 2), ("runtime.eval_interval", 0), epochs=2, iters=3)
    trainer = Trainer(cfg, get_task("classification"), hooks=[Recorder(events)])
    trainer.register_hooks([lambda tr, event: calls.append(event)])  # a function hook gets every event's name
    trainer.train()
    expected = [("before_train", 0)]
    it = 0
    for epoch in range(2):
        expected.append(("before_epoch", epoch))
        for i in range(3):
            log = (it + 1) % 2 == 0 or i == 2
            expected.append(("before_step", it, log))
            it += 1
            if log:
                expected.append(("log_metrics", it))
            expected.append(("after_step", it))
        expected.append(("after_epoch", epoch + 1))
    expected.append(("after_train", 2))
    assert events == expected
    assert calls == [e[0] for e in expected if e[0] != "log_metrics"]
    assert trainer.batch is None and trainer.hooks[0].trainer is trainer
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert [(r["iter"], r["hook_value"]) for r in train] == [(e[1], float(e[1])) for e in expected
                                                             if e[0] == "log_metrics"]
    assert all("routing" not in r for r in train)  # the engine adds no routing statistics of its own


def test_after_train_runs_when_training_fails(tmp_path: Path):
    events = []

    class Boom(HookBase):  # fails a step after the routing hook attached its recorder
        def before_step(self):
            raise RuntimeError("boom")

    stats = RoutingStatsHook()
    trainer = Trainer(tiny_cfg(tmp_path, epochs=1, iters=2), get_task("classification"),
                      hooks=[stats, Recorder(events), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert events[-1] == ("after_train", 0) and stats._recorder is None
    layers = [m for m in trainer.model.modules() if isinstance(m, RoutingSource)]
    assert layers and not any(m.__dict__.get("_routing_sinks") for m in layers)  # nothing left attached


def _result() -> RoutingResult:
    """2 images x 4 patches (2 x 2 grid) x 3 experts: image 0 mostly expert 0, a dropped patch, expert 2 unused
    by argmax but used by a top-2 weight."""
    w = torch.tensor([[[0.7, 0.0, 0.3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
                      [[0.0, 1.0, 0.0], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]])
    p = torch.tensor([[[0.6, 0.1, 0.3], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.4, 0.3, 0.3]],
                      [[0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.4, 0.2, 0.4]]])
    return RoutingResult(weights=w, probs=p, grid=(2, 2))


def test_routing_log_stats_match_analysis_stats():
    r = _result()
    labels = torch.tensor([[1, 1, 2, 2], [3, 3, 2, -1]])
    got = routing_log_stats(r, labels)
    assert list(got) == LOGGED
    flat = r.weights.reshape(-1, 3)
    load = (flat > 0).float().sum(0)                                     # [3, 4, 2] patches per expert
    use = load / flat.shape[0]
    experts = S.assigned_experts(r.weights).reshape(-1).numpy()         # [0, 0, 1, -1, 1, 0, 1, 0]
    assert experts.tolist() == [0, 0, 1, -1, 1, 0, 1, 0]
    hand_entropy = float(np.mean([-sum(q * math.log(q) for q in row) for row in r.probs.reshape(-1, 3).tolist()]))
    assert got["entropy"] == pytest.approx(hand_entropy, abs=1e-6) == S.mean_entropy(r.probs)
    assert got["usage"] == pytest.approx(use.tolist()) and got["usage"] == S.usage(r.weights).tolist()
    assert got["mean_weight"] == pytest.approx(flat.mean(0).tolist())
    assert got["dropped_fraction"] == pytest.approx(1 / 8) == S.dropped_rate(r.weights)
    assert got["collapsed_experts"] == 0.0
    assert got["usage_entropy"] == pytest.approx(S.usage_entropy(load))
    assert got["imbalance"] == pytest.approx(4 / 2) == S.imbalance(load)
    pos = S.nmi_with_baseline(experts, np.tile(np.arange(4), 2), shuffles=1)
    cls = S.nmi_with_baseline(experts, labels.reshape(-1).numpy(), shuffles=1)
    assert (got["nmi_position"], got["nmi_position_baseline"]) == (pos["nmi"], pos["baseline"])
    assert (got["nmi_class"], got["nmi_class_baseline"]) == (cls["nmi"], cls["baseline"])
    assert list(routing_log_stats(r)) == LOGGED[:-2]                      # no labels: no class NMI


class _Layer(nn.Module, RoutingSource):
    """Emits the fixed routing of :func:`_result` on every forward."""

    def forward(self, x):
        self.emit_routing(_result())
        return x


class _Task:
    name = "stub"

    def __init__(self, labels):
        self.labels, self.asked = labels, []

    def patch_labels(self, batch, grid, num_classes=None):
        self.asked.append((batch, grid, num_classes))
        return self.labels


class _Trainer:
    def __init__(self, task):
        self.model = nn.Sequential(_Layer(), _Layer())
        self.task, self.is_main, self.batch, self.logging_step = task, True, "the batch", True


def test_routing_stats_hook_logs_the_first_forward_of_each_layer():
    labels = torch.tensor([[1, 1, 2, 2], [3, 3, 2, -1]])
    task = _Task(labels)
    trainer = _Trainer(task)
    hook = RoutingStatsHook()
    hook.trainer = trainer
    hook.before_step()
    trainer.model(torch.zeros(1))
    trainer.model(torch.zeros(1))           # a second forward in the step: only the first is logged
    out = hook.log_metrics()
    hook.after_step()
    assert list(out) == ["routing"] and list(out["routing"]) == ["0", "1"]
    assert out["routing"]["0"] == routing_log_stats(_result(), labels)
    assert task.asked == [("the batch", (2, 2), None)] * 2
    assert hook.log_metrics() == {}        # cleared; nothing recorded after the step
    trainer.logging_step = False           # not a logging step: nothing attached
    hook.before_step()
    trainer.model(torch.zeros(1))
    assert hook.log_metrics() == {}
    trainer.logging_step, trainer.is_main = True, False   # other ranks record nothing
    hook.before_step()
    trainer.model(torch.zeros(1))
    assert hook.log_metrics() == {}
    task.labels = None                     # a batch without targets: no class NMI
    trainer.is_main = True
    hook.before_step()
    trainer.model(torch.zeros(1))
    assert list(hook.log_metrics()["routing"]["1"]) == LOGGED[:-2]


def test_default_hooks_log_routing_in_training(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, ("runtime.eval_interval", 0), epochs=1, iters=2)
    task = get_task("classification")
    hooks = default_hooks(cfg, task)
    assert [type(h) for h in hooks] == [RoutingStatsHook, SplitRecordHook]
    Trainer(cfg, task, hooks=hooks).train()
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert len(train) == 2 and all(list(r)[-2:] == ["routing", "time"] for r in train)
    for r in train:
        assert list(r["routing"]) == ["backbone.stages.0.layers.0", "backbone.stages.1.layers.0"]
        assert all(list(s) == LOGGED for s in r["routing"].values())
