"""Training engine: exact resume, atomic checkpoints, phases, NaN stop, EMA / logging, 2-process DDP (gloo)."""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from pce.engine import (NonFiniteLossError, PCEScheduler, PhaseController, Trainer, atomic_save, build_phases,
                        evaluate_checkpoint, load_checkpoint, load_config)
from pce.engine.config import config_to_dict, load_saved_config
from pce.tasks import get_task
from pce.tasks.classification import ClassificationTask
from pce.tasks.hooks import default_hooks

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo_cls_digits.py"

# a very small PCE classifier on 8x8 digits: maps 8 (2x2 patches of 4) -> 4 (2x2 patches of 2)
TINY_STAGES = [dict(channels=8, depth=1, patch_size=4, stride=1), dict(channels=16, depth=1, patch_size=2, stride=2)]
PHASES = [dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
          dict(name="route", epochs=1, router_override=None, keys_trainable=False, lr_mult=0.5),
          dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True)]


def tiny_cfg(work_dir: Path, *extra, epochs: int = 3, iters: int = 3):
    overrides = [
        ("runtime.work_dir", str(work_dir)),
        ("model.backbone_overrides.stem_channels", 8), ("model.backbone_overrides.stages", TINY_STAGES),
        ("model.input_shape", [1, 8, 8]),
        ("data.train.kwargs.size", 8), ("data.val.kwargs.size", 8), ("data.test.name", ""),
        ("data.batch_size", 16), ("data.eval_batch_size", 256),
        ("schedule.epochs", epochs), ("schedule.iters_per_epoch", iters), ("phases", PHASES),
        ("runtime.kmeans_init_batches", 2), ("runtime.tensorboard", False), ("runtime.progress_bar", False),
        ("runtime.log_interval", 2), ("runtime.num_threads", 0),
    ]
    return load_config(DEMO, overrides + list(extra))


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def hook(trainer, event):
        if event == "after_epoch" and trainer.epoch == epoch:
            raise Stop()
    return hook


def record_phases(log):
    def hook(trainer, event):
        if event == "before_epoch":
            bb = trainer.model.backbone
            layer = next(bb.pce_layers())
            log.append({"epoch": trainer.epoch,
                        "override": type(layer.router_override).__name__ if layer.router_override is not None else None,
                        "keys_grad": [r.keys.requires_grad for r in bb.key_routers()],
                        "lr": trainer.optimizer.param_groups[0]["lr"]})
    return hook


def test_resume_equals_uninterrupted(tmp_path: Path):
    """Stop after epoch 1 (before the K-Means / learned-router phase), resume: same losses, same weights."""
    phases: list = []
    full = Trainer(tiny_cfg(tmp_path / "full"), get_task("classification"), hooks=[record_phases(phases)])
    out = full.train()
    assert len(full.loss_history) == 9 and out["epochs"] == 3
    # phase transitions seen by the trainer: override uniform -> learned; keys frozen -> trainable at epoch 3
    assert [p["epoch"] for p in phases] == [0, 1, 2]
    assert phases[0]["override"] is not None and phases[1]["override"] is None and phases[2]["override"] is None
    # lr = base 0.05 x phase lr_mult x cosine(progress): 'route' (x0.5) at 3/9, 'finetune' (x1) at 6/9 of training
    assert phases[1]["lr"] == pytest.approx(0.05 * 0.5 * 0.75) and phases[2]["lr"] == pytest.approx(0.05 * 0.25)
    assert [all(p["keys_grad"]) for p in phases] == [False, False, True]

    cfg = tiny_cfg(tmp_path / "split")
    first = Trainer(cfg, get_task("classification"), hooks=[stop_after(1)])
    with pytest.raises(Stop):
        first.train()
    ckpt = load_checkpoint(tmp_path / "split/latest.pth")  # weights_only=True
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3 and ckpt["phase"]["keys_initialized"] is False
    resumed = Trainer(cfg, get_task("classification"), resume=True)
    assert resumed.epoch == 1 and resumed.iteration == 3
    out2 = resumed.train()
    assert first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert out2["final"]["top1"] == out["final"]["top1"]
    assert resumed.phase_ctl.keys_initialized
    # the work dir holds everything rank 0 writes, and the merged config reloads to the same config
    names = {p.name for p in (tmp_path / "split").iterdir()}
    assert {"latest.pth", "best.pth", "config.json", "config.py", "metrics.jsonl", "train.log"} <= names
    assert config_to_dict(load_config(tmp_path / "split/config.py")) == config_to_dict(cfg)
    assert config_to_dict(load_saved_config(tmp_path / "split/config.json")) == config_to_dict(cfg)
    records = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records if r["type"] == "phase"] == ["stabilise", "route", "finetune"]
    # one resume record, between the first process's records and the resumed one's (summarize_runs' pause mark)
    kinds = [r["type"] for r in records]
    assert kinds.count("resume") == 1
    at = kinds.index("resume")
    assert records[at]["epoch"] == 1 and records[at]["iter"] == 3 and records[at]["checkpoint"].endswith("latest.pth")
    assert all(r.get("epoch", 0) <= 1 for r in records[:at]) and records[at + 1]["epoch"] == 2


def test_atomic_checkpoint(tmp_path: Path, monkeypatch):
    path = tmp_path / "latest.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full (simulated crash while saving)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    good = load_checkpoint(path)
    assert good["epoch"] == 1 and torch.equal(good["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temp file left behind

    # in a run: the save at the end of epoch 2 crashes -> latest.pth is still epoch 1's
    cfg = tiny_cfg(tmp_path / "run", ("phases", []), ("runtime.eval_interval", 0), epochs=2, iters=1)
    trainer = Trainer(cfg, get_task("classification"))

    def crash_in_epoch_2(tr, event):
        if event == "before_epoch" and tr.epoch == 1:
            monkeypatch.setattr(torch, "save", crashing_save)

    trainer.register_hook(crash_in_epoch_2)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "run/latest.pth")["epoch"] == 1


def test_phase_controller_and_scheduler():
    """requires_grad of the keys flips at the right epoch, overrides are set/cleared, lr multipliers apply."""
    from pce.models.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("pce_fmnist", 10, stem_channels=8, stages=[
        dict(channels=8, depth=1, patch_size=4, stride=1, attention=True), dict(channels=16, patch_size=2)])
    phases = build_phases([dict(name="stabilise", epochs=2, router_override="uniform", keys_trainable=False,
                                attention=False, lr_mult=1.0),
                           dict(name="route", epochs=1, router_override=None, keys_trainable=False, lr_mult=0.5),
                           dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True,
                                attention=True, lr_mult=0.1)], total_epochs=5)
    ctl = PhaseController(phases, kmeans_init_batches=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = PCEScheduler(opt, ctl.phase_epochs, base_lr=0.2, phase_multipliers=ctl.lr_multipliers)
    layers = list(model.backbone.pce_layers())
    routers = list(model.backbone.key_routers())
    attn = [m for m in model.modules() if type(m).__name__ == "DeformableAttention"]
    keys0 = [r.keys.detach().clone() for r in routers]
    calls = []
    seen = []
    for epoch in range(5):
        info = ctl.on_epoch_start(epoch, [model], lambda: calls.append(epoch) or [torch.randn(8, 1, 8, 8)])
        seen.append((info["phase"].name, info["started"], layers[0].router_override is not None,
                     routers[0].keys.requires_grad, attn[0].enabled, round(opt.param_groups[0]["lr"], 6)))
        opt.step()
        sched.step()
    assert seen == [("stabilise", True, True, False, False, 0.2), ("stabilise", False, True, False, False, 0.2),
                    ("route", True, False, False, False, 0.1), ("finetune", True, False, True, True, 0.02),
                    ("finetune", False, False, True, True, 0.02)]
    assert calls == [2]  # K-Means right before the first learned-router phase, once
    assert not torch.equal(keys0[0], routers[0].keys)
    state = ctl.state_dict()
    ctl2 = PhaseController(phases, kmeans_init_batches=1)
    ctl2.load_state_dict(state)
    assert ctl2.keys_initialized and ctl2.current == 2

    # the seed's usage: one step per epoch, phase i from sum(phase_epochs[:i]) on, lr = base_lr * mult_i
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = PCEScheduler(opt2, phase_epochs=[2, 5, 3], base_lr=0.1, phase_multipliers=[1.0, 0.5, 0.1])
    lrs = []
    for _ in range(10):
        lrs.append(round(opt2.param_groups[0]["lr"], 6))
        opt2.step()
        s2.step()
    assert lrs == [0.1] * 2 + [0.05] * 5 + [0.01] * 3


def test_nan_loss_stops_with_clear_error(tmp_path: Path):
    class NaNAt(ClassificationTask):
        def __init__(self, step):
            super().__init__()
            self.step, self.calls = step, 0

        def train_step(self, model, batch, device):
            losses = super().train_step(model, batch, device)
            self.calls += 1
            if self.calls == self.step:
                losses["loss_cls"] = losses["loss_cls"] * float("nan")
            return losses

    cfg = tiny_cfg(tmp_path, ("phases", []), ("runtime.eval_interval", 0), epochs=3, iters=2)
    trainer = Trainer(cfg, NaNAt(step=3))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "epoch 2" in msg and "iteration 1/2" in msg and "global step 3" in msg
    assert "loss_cls=nan" in msg and "loss_router=" in msg and "latest.pth" in msg
    assert load_checkpoint(tmp_path / "latest.pth")["epoch"] == 1  # the last good checkpoint is kept


def test_ema_clip_channels_last_logging(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, ("runtime.ema", 0.9), ("optimizer.grad_clip", 1.0), ("runtime.channels_last", True),
                   ("runtime.amp", "bf16"), ("runtime.tensorboard", True), ("optimizer.type", "adamw"),
                   ("optimizer.lr", 0.003), ("phases", []), epochs=1, iters=2)
    task = get_task("classification")
    out = Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()
    ckpt = load_checkpoint(tmp_path / "latest.pth")
    assert ckpt["ema"] is not None and int(ckpt["ema"]["n_averaged"]) == 2
    train = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in train if r["type"] == "train")
    assert {"loss", "loss_cls", "loss_router", "lr", "images_per_s", "grad_norm"} <= set(rec)
    layer = next(iter(rec["routing"].values()))
    assert len(layer["usage"]) == 4 and "entropy" in layer
    assert any(r["type"] == "val" for r in train) and any(r["type"] == "test" for r in train)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    res = evaluate_checkpoint(cfg, get_task("classification"), tmp_path / "latest.pth", split="val")
    assert res["num_samples"] == 450 and abs(res["top1"] - out["final"]["top1"]) < 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, work_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pce.engine import cleanup_distributed, init_distributed

    info = init_distributed()
    try:
        # keys trainable then frozen again: DDP is rebuilt at each change, and the last epoch's EMA-updated keys
        # must be kept equal across ranks by the engine (DDP only all-reduces gradients)
        phases = [PHASES[0], dict(PHASES[2], epochs=1), dict(PHASES[1], epochs=-1)]
        cfg = tiny_cfg(Path(work_dir), ("runtime.device", "cpu"), ("phases", phases), epochs=3, iters=2)
        task = get_task("classification")
        trainer = Trainer(cfg, task, hooks=default_hooks(cfg, task))  # routing statistics on rank 0 only
        out = trainer.train()
        flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save({"rank": info.rank, "world": info.world_size, "backend": info.backend,
                    "same_params": all(torch.equal(gathered[0], g) for g in gathered),
                    "final": {k: out["final"][k] for k in ("top1", "num_samples")},
                    "ddp": trainer.ddp_model is not None}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


def test_ddp_two_processes_gloo(tmp_path: Path):
    import torch.multiprocessing as mp

    (tmp_path / "out").mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "wd"), str(tmp_path / "out")), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"out/rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in res] == [2, 2] and res[0]["backend"] == "gloo" and all(r["ddp"] for r in res)
    assert all(r["same_params"] for r in res)  # gradients all-reduced, EMA-updated router keys synchronised
    assert res[0]["final"] == res[1]["final"] and res[0]["final"]["num_samples"] == 450  # merged over ranks
    # the merged result is the model of the checkpoint evaluated in one process (same BatchNorm statistics)
    cfg = load_config(tmp_path / "wd/config.py")
    single = evaluate_checkpoint(cfg, get_task("classification"), tmp_path / "wd/latest.pth", split="val")
    assert single["top1"] == res[0]["final"]["top1"]
    ckpt = load_checkpoint(tmp_path / "wd/latest.pth")
    assert len(ckpt["rng"]) == 2 and ckpt["epoch"] == 3 and ckpt["iteration"] == 6
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == sorted(
        ["best.pth", "config.json", "config.py", "latest.pth", "metrics.jsonl", "train.log"])


def test_param_scheduler_warmup_cosine_multistep():
    from pce.engine import build_param_scheduler

    cos = build_param_scheduler(dict(type="cosine", warmup_epochs=1.0, warmup_factor=0.1, min_lr_factor=0.0), 10)
    assert cos(0.0) == pytest.approx(0.1)                       # warmup starts at warmup_factor
    assert cos(0.05) == pytest.approx(0.1 + 0.5 * (cos(0.1) - 0.1))  # linear warmup ...
    assert cos(0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # ... to the cosine curve (global time)
    assert cos(0.999) < 1e-3
    ms = build_param_scheduler(dict(type="multistep", milestones=[4, 8], gamma=0.1), 10)
    assert [round(ms(e / 10), 6) for e in range(10)] == [1.0] * 4 + [0.1] * 4 + [0.01] * 2
    assert build_param_scheduler(dict(type="constant"), 10)(0.7) == 1.0
    with pytest.raises(ValueError, match="milestones"):
        build_param_scheduler(dict(type="multistep", milestones=[12]), 10)


def _expert_kernels(trainer, model=None):
    """The first stacked convolution of the first PCE layer: a list of E kernels."""
    layer = next((model or trainer.model).backbone.pce_layers())
    return [w.detach().clone() for w in next(m for m in layer.experts.modules() if hasattr(m, "weights")).weights]


def test_shared_phase_then_upcycle_trains_expert0_and_copies_it(tmp_path: Path):
    """A "shared" stabilisation phase sends every patch to expert 0 (the others get no gradient); the next phase
    with upcycle=True copies expert 0 into every expert, once: a resume inside that phase does not copy again."""
    phases = [dict(name="shared", epochs=1, router_override="shared", keys_trainable=False),
              dict(name="route", epochs=-1, router_override=None, keys_trainable=False, upcycle=True)]
    cfg = tiny_cfg(tmp_path, ("phases", phases), ("runtime.ema", 0.5), epochs=3)
    start, end, ema_start = {}, {}, {}

    def hook(trainer, event):
        if event == "before_epoch":      # runs after the phase settings (and the upcycle) were applied
            start[trainer.epoch] = _expert_kernels(trainer)
            ema_start[trainer.epoch] = _expert_kernels(trainer, trainer.ema.module)
        if event == "after_epoch":
            end[trainer.epoch] = _expert_kernels(trainer)
            if trainer.epoch == 2:
                raise Stop()

    first = Trainer(cfg, get_task("classification"), hooks=[hook])
    init = _expert_kernels(first)
    with pytest.raises(Stop):
        first.train()
    shared = end[1]
    assert not torch.equal(shared[0], init[0])                        # expert 0 trained on every patch...
    assert all(torch.equal(shared[e], init[e]) for e in range(1, len(init)))  # ...the others on none
    assert all(torch.equal(w, shared[0]) for w in start[1])            # 'route' starts from E copies of it
    assert not all(torch.equal(w, shared[0]) for w in end[2])          # and routing trains them apart
    assert all(torch.equal(w, ema_start[1][0]) for w in ema_start[1])  # the EMA copy was upcycled too
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["name"], r["upcycled_layers"]) for r in records if r["type"] == "phase"] == [("shared", 0),
                                                                                             ("route", 2)]
    resumed = Trainer(cfg, get_task("classification"), resume=True, hooks=[hook])
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(start[2], end[2]))   # resume in the phase: no second copy
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("upcycled_layers", 0) for r in records if r["type"] == "phase") == 2


def test_upcycle_makes_routing_irrelevant():
    """After upcycling, all experts are the same function: any routing gives the output of expert 0."""
    from pce.models.presets import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("pce_fmnist", stem_channels=8, stages=[dict(channels=8, depth=1, patch_size=7, stride=2),
                                                               dict(channels=16, depth=1, patch_size=2, stride=2)])
    x = torch.randn(4, 1, 28, 28)
    bb.train()
    bb.set_router_override("shared")
    bb(x)                                   # BN statistics of expert 0 only
    assert bb.upcycle_experts(0) == 2
    bb.eval()
    ref = {k: v.clone() for k, v in bb(x).items()}
    for layer in bb.pce_layers():
        bank = layer.experts
        for m in bank.modules():
            if hasattr(m, "weights"):
                for w in m.weights:
                    assert torch.equal(w, m.weights[0])
    bb.set_router_override("uniform")        # eval: every expert with weight 1/E: still expert 0's function
    routed, routing = bb(x, return_routing=True)
    assert all(bool((r.weights > 0).all()) for r in routing)
    for k in ref:
        torch.testing.assert_close(routed[k], ref[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="source expert"):
        next(bb.pce_layers()).experts.upcycle(7)
