"""Training at scale: gradient accumulation (equal to a larger batch, hand-computed averaged gradients, DDP
``no_sync``, exact mid-epoch resume), the lr scaled by the total batch, SyncBatchNorm conversion, bf16 autocast
on the CPU, and a 2-process ``torchrun`` run of ``tools/train.py`` on CPU / gloo (docs/DISTRIBUTED.md)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pce.engine import Trainer, evaluate_checkpoint, load_checkpoint, load_config
from pce.engine.distributed import convert_sync_batchnorm
from pce.engine.errors import PCEError
from pce.engine.optim import scaled_lr
from pce.engine.runtime import resolve_amp_dtype
from pce.engine.validation import ConfigError
from pce.moe.stacked import StackedBatchNorm2d
from pce.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo_cls_digits.py"
# a very small PCE classifier on 8x8 digits (as tests/test_engine.py)
TINY = [("model.backbone_overrides.stem_channels", 8),
        ("model.backbone_overrides.stages", [dict(channels=8, depth=1, patch_size=4, stride=1),
                                             dict(channels=16, depth=1, patch_size=2, stride=2)]),
        ("model.input_shape", [1, 8, 8]), ("data.train.kwargs.size", 8), ("data.val.kwargs.size", 8),
        ("data.test.name", ""), ("data.eval_batch_size", 256), ("runtime.tensorboard", False),
        ("runtime.progress_bar", False), ("runtime.num_threads", 0), ("runtime.log_interval", 1)]
PHASES = [dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
          dict(name="route", epochs=1, router_override=None, keys_trainable=False, lr_mult=0.5),
          dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True)]


@contextlib.contextmanager
def pce_log():
    """The messages of the ``pce`` logger (it does not propagate to pytest's caplog once a trainer set it up)."""
    messages: list = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    log, handler = logging.getLogger("pce"), Keep()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def tiny_cfg(work_dir: Path, *extra):
    return load_config(DEMO, [("runtime.work_dir", str(work_dir))] + TINY + list(extra))


class ToyTask:
    """Linear regression in float64 through the real Trainer: no BatchNorm, so N micro-batches of B and one
    batch of N x B give the same mean gradient."""
    name = "toy"
    collate_fn = None

    def __init__(self, n: int = 48, d: int = 5) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, d, generator=g, dtype=torch.float64)
        self.y = torch.randn(n, 1, generator=g, dtype=torch.float64)

    def build_datasets(self, cfg, splits=("train", "val"), evaluate=False):
        return {"train": TensorDataset(self.x, self.y)}

    def build_model(self, cfg):
        return nn.Linear(self.x.shape[1], 1).double()

    def train_step(self, model, batch, device):
        x, y = batch
        return {"loss_mse": F.mse_loss(model(x), y)}

    def batch_size(self, batch):
        return len(batch[0])


def toy_cfg(work_dir: Path, batch: int, accumulate: int, *extra):
    return tiny_cfg(work_dir, ("data.batch_size", batch), ("optimizer.accumulate_steps", accumulate),
                    ("phases", []), ("runtime.kmeans_init_batches", 0), ("runtime.final_test", False),
                    ("data.num_workers", 0), *extra)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_accumulation_equals_larger_batch_and_hand_sgd(tmp_path: Path):
    """accumulate 2 x batch 4 == batch 8 (momentum, active grad clipping, cosine lr, EMA all per optimizer step),
    and plain SGD equals the hand computation over the sampler's permutation."""
    step = [("optimizer.momentum", 0.9), ("optimizer.weight_decay", 0.0), ("optimizer.grad_clip", 0.3),
            ("optimizer.lr", 0.2), ("runtime.ema", 0.5), ("schedule.epochs", 2), ("schedule.iters_per_epoch", 3)]
    runs = {}
    for name, (bs, acc) in {"acc": (4, 2), "big": (8, 1)}.items():
        trainer = Trainer(toy_cfg(tmp_path / name, bs, acc, *step), ToyTask())
        trainer.train()
        runs[name] = trainer
    acc, big = runs["acc"], runs["big"]
    assert acc.iters_per_epoch == big.iters_per_epoch == 3 and acc.iteration == big.iteration == 6
    assert acc.scheduler.last_epoch == 6 and int(acc.ema.n_averaged) == 6
    assert torch.allclose(params(acc.model), params(big.model), rtol=0, atol=1e-12)
    assert torch.allclose(params(acc.ema.module), params(big.ema.module), rtol=0, atol=1e-12)
    assert acc.loss_history == pytest.approx(big.loss_history, abs=1e-6)  # logged values are float32
    assert acc.optimizer.param_groups[0]["lr"] == big.optimizer.param_groups[0]["lr"]

    # the epoch's remainder: 48 samples in batches of 5 -> 10 loader batches -> steps of 3, 3, 3 and 1 micro-batches;
    # the last one (3 samples) alone, scaled by 1/1, is batch 15's last step
    rem = {}
    for name, (bs, n) in {"acc": (5, 3), "big": (15, 1)}.items():
        rem[name] = Trainer(toy_cfg(tmp_path / f"rem_{name}", bs, n, *step[:-2], ("schedule.epochs", 1)), ToyTask())
        rem[name].train()
    assert rem["acc"].iters_per_epoch == rem["big"].iters_per_epoch == rem["acc"].iteration == 4
    assert torch.allclose(params(rem["acc"].model), params(rem["big"].model), rtol=0, atol=1e-12)

    # plain SGD, constant lr: W <- W - lr * mean over the step's 2 x 3 samples of d(mse)/dW, by hand
    lr, task = 0.1, ToyTask()
    plain = [("optimizer.momentum", 0.0), ("optimizer.weight_decay", 0.0), ("optimizer.lr", lr),
             ("schedule.lr_scheduler.type", "constant"), ("schedule.lr_scheduler.warmup_epochs", 0.0),
             ("schedule.epochs", 1), ("schedule.max_iters", 2), ("optimizer.grad_clip", 0.0)]
    trainer = Trainer(toy_cfg(tmp_path / "hand", 3, 2, *plain), task)
    w, b = (p.detach().clone() for p in trainer.model.parameters())
    trainer.train()
    order = torch.randperm(len(task.x), generator=torch.Generator().manual_seed(0))  # DistributedSampler, epoch 0
    for s in range(2):
        idx = order[6 * s: 6 * s + 6]
        x, y = task.x[idx], task.y[idx]
        r = x @ w.T + b - y                        # [6, 1]
        w, b = w - lr * 2 * (r.T @ x) / 6, b - lr * 2 * r.sum(0) / 6
    assert torch.allclose(trainer.model.weight, w, atol=1e-12) and torch.allclose(trainer.model.bias, b, atol=1e-12)


class NoSyncProbe(nn.Module):
    """A DDP stand-in: counts the micro-batches run inside ``no_sync()``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.unsynced, self.inside = module, 0, False

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.unsynced += int(self.inside)
        return self.module(x)


def test_no_sync_on_all_but_the_last_micro_batch(tmp_path: Path):
    trainer = Trainer(toy_cfg(tmp_path, 4, 3, ("schedule.epochs", 1)), ToyTask())
    probe = NoSyncProbe(trainer.model)
    loader = iter(trainer.train_loader)
    batches = [next(loader) for _ in range(3)]
    names, values, _, _ = trainer._train_step(probe, batches, 0, 0)
    assert probe.unsynced == 2 and names == ["loss_mse"]
    assert trainer.scheduler.last_epoch == 1  # one scheduler step for the 3 micro-batches
    trainer.lock.release()


def test_accumulation_on_the_real_trainer_matches_averaged_gradients(tmp_path: Path):
    """The tiny PCE classifier (BatchNorm in train mode, router loss): one optimizer step of accumulate 2 equals
    an independent replay, ``p - lr * (g(batch 1) + g(batch 2)) / 2``, from the same start and RNG state."""
    lr = 0.05
    cfg = tiny_cfg(tmp_path, ("data.batch_size", 8), ("optimizer.accumulate_steps", 2), ("phases", []),
                   ("runtime.kmeans_init_batches", 0), ("optimizer.momentum", 0.0), ("optimizer.nesterov", False),
                   ("optimizer.weight_decay", 0.0), ("optimizer.grad_clip", 0.0), ("optimizer.lr", lr),
                   ("schedule.lr_scheduler.type", "constant"), ("schedule.lr_scheduler.warmup_epochs", 0.0),
                   ("schedule.epochs", 1), ("schedule.max_iters", 1), ("data.val.name", ""))
    real = get_task("classification")
    seen: dict = {"batches": []}

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def train_step(self, model, batch, device):
            seen["batches"].append(batch)
            return real.train_step(model, batch, device)

    def snapshot(trainer, event):
        if event == "before_step":
            seen["model"], seen["rng"] = copy.deepcopy(trainer.model), torch.get_rng_state()

    trainer = Trainer(cfg, Recording(), hooks=[snapshot])
    trainer.train()
    assert len(seen["batches"]) == 2 and trainer.iteration == 1
    ref = seen["model"]
    ref.train()
    torch.set_rng_state(seen["rng"])
    for batch in seen["batches"]:
        (sum(real.train_step(ref, batch, torch.device("cpu")).values()) / 2).backward()
    n = 0
    for (name, p0), p1 in zip(ref.named_parameters(), trainer.model.parameters()):
        expect = p0.detach() - lr * p0.grad if p0.grad is not None else p0.detach()
        assert torch.allclose(p1.detach(), expect, rtol=1e-4, atol=1e-6), name
        n += p0.grad is not None
    assert n > 10
    # the step is not the first micro-batch's gradient alone
    first = copy.deepcopy(seen["model"])
    torch.set_rng_state(seen["rng"])
    sum(real.train_step(first, seen["batches"][0], torch.device("cpu")).values()).backward()
    assert not torch.allclose(params(trainer.model), torch.cat([
        (p.detach() - lr * p.grad if p.grad is not None else p.detach()).reshape(-1) for p in first.parameters()]))


def test_exact_resume_mid_epoch_with_accumulation(tmp_path: Path):
    """max_iters stops inside epoch 2 (after its K-Means init); the resumed run skips 1 step = 2 loader batches
    and ends with the uninterrupted run's losses and weights."""
    common = [("data.batch_size", 16), ("optimizer.accumulate_steps", 2), ("phases", PHASES),
              ("runtime.kmeans_init_batches", 2), ("schedule.epochs", 3), ("schedule.iters_per_epoch", 2)]
    task = get_task("classification")
    full = Trainer(tiny_cfg(tmp_path / "full", *common), task)
    full.train()
    assert full.iteration == 6 and len(full.loss_history) == 6
    first = Trainer(tiny_cfg(tmp_path / "split", *common, ("schedule.max_iters", 3)), task)
    first.train()
    ckpt = load_checkpoint(tmp_path / "split/latest.pth")
    assert (ckpt["epoch"], ckpt["epoch_iter"], ckpt["iteration"]) == (1, 1, 3)
    resumed = Trainer(tiny_cfg(tmp_path / "split", *common), task, resume=True)
    resumed.train()
    assert first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_auto_scale_lr_by_total_batch(tmp_path: Path):
    opt = dict(lr=0.1, accumulate_steps=2, auto_scale_lr=dict(enable=True, base_batch_size=64))
    assert scaled_lr(opt, 16, 4) == pytest.approx(0.1 * 16 * 4 * 2 / 64)        # 0.2
    assert scaled_lr(dict(opt, auto_scale_lr=dict(enable=False, base_batch_size=64)), 16, 4) == 0.1
    with pytest.raises(PCEError, match=r"^optimizer.auto_scale_lr.base_batch_size: is 0 .*\(.*\)$"):
        scaled_lr(dict(opt, auto_scale_lr=dict(enable=True, base_batch_size=0)), 16, 1)
    with pytest.raises(ConfigError, match=r"'optimizer.accumulate_steps' .*must be > 0, got 0"):  # at config load
        Trainer(toy_cfg(tmp_path / "bad", 4, 0), ToyTask())
    assert not (tmp_path / "bad").exists()   # refused before anything is written
    cfg = toy_cfg(tmp_path / "ok", 6, 2, ("optimizer.lr", 0.1), ("optimizer.auto_scale_lr.enable", True),
                  ("optimizer.auto_scale_lr.base_batch_size", 48), ("schedule.lr_scheduler.type", "constant"),
                  ("schedule.lr_scheduler.warmup_epochs", 0.0), ("schedule.epochs", 1))
    with pce_log() as messages:
        trainer = Trainer(cfg, ToyTask())
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 6 * 1 * 2 / 48)   # 0.025
    assert sum("auto_scale_lr: lr 0.025 = optimizer.lr 0.1 x total batch 12" in m for m in messages) == 1
    trainer.train()
    # resumed with another total batch: the checkpoint's base lr is kept, with a warning
    cfg2 = toy_cfg(tmp_path / "ok", 6, 2, ("optimizer.lr", 0.1), ("optimizer.auto_scale_lr.enable", True),
                   ("optimizer.auto_scale_lr.base_batch_size", 24), ("schedule.lr_scheduler.type", "constant"),
                   ("schedule.lr_scheduler.warmup_epochs", 0.0), ("schedule.epochs", 1))
    with pce_log() as messages:
        resumed = Trainer(cfg2, ToyTask(), resume=True)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert any("base lr 0.025 is kept; this run's config gives 0.05" in m for m in messages)
    resumed.lock.release()


def test_sync_batchnorm_conversion_keeps_expert_norms():
    model = get_task("classification").build_model(tiny_cfg(Path("unused")))
    plain = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    stacked = [n for n, m in model.named_modules() if isinstance(m, StackedBatchNorm2d)]
    assert plain and stacked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    out = model(x)
    assert convert_sync_batchnorm(model) == len(plain)
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is nn.SyncBatchNorm for n in plain)
    assert all(type(mods[n]) is StackedBatchNorm2d for n in stacked)   # subclasses kept
    assert [id(p) for p in model.parameters()] == ids                  # the optimizer's parameters stay
    assert model.state_dict().keys() == before.keys()                  # checkpoints load either way
    assert torch.equal(model(x), out)                                  # eval mode: running statistics


def test_bf16_autocast_on_cpu_train_and_eval(tmp_path: Path):
    assert resolve_amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pce_log() as messages:
        assert resolve_amp_dtype("fp16", torch.device("cpu")) is None     # falls back to fp32 with a warning
    assert any("runtime.amp=fp16" in m and "fp32" in m for m in messages)
    out = {}
    for amp in ("none", "bf16"):
        cfg = tiny_cfg(tmp_path / amp, ("runtime.amp", amp), ("data.batch_size", 32), ("phases", []),
                       ("runtime.kmeans_init_batches", 0), ("schedule.epochs", 1), ("schedule.max_iters", 2))
        trainer = Trainer(cfg, get_task("classification"))
        dtypes = []
        conv = next(m for m in trainer.model.modules() if type(m) is nn.Conv2d)
        conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        res = trainer.train()
        out[amp] = (trainer.loss_history, res["final"]["top1"], set(dtypes))
    (l32, top32, d32), (l16, top16, d16) = out["none"], out["bf16"]
    assert d32 == {torch.float32} and d16 == {torch.bfloat16}   # train steps and the evaluation ran in bf16
    assert all(torch.isfinite(torch.tensor(l16)))
    assert l16[0] == pytest.approx(l32[0], rel=0.02)            # same start: bf16 rounding only
    assert l16[0] != l32[0]
    assert abs(top16 - top32) < 0.1


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path: Path):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 tools/train.py``: DDP on CPU / gloo
    with accumulation 2 and auto-scaled lr; both ranks end with identical weights, the checkpoint loads."""
    wd = tmp_path / "wd"
    opts = ["runtime.device='cpu'", "data.batch_size=16", "optimizer.accumulate_steps=2", "optimizer.lr=0.05",
            "optimizer.auto_scale_lr.enable=True", "optimizer.auto_scale_lr.base_batch_size=32",
            "schedule.epochs=2", "schedule.iters_per_epoch=2", "runtime.kmeans_init_batches=2",
            "runtime.sync_bn=True", "runtime.num_threads=1", "data.num_workers=0", f"phases={PHASES[:2]!r}"]
    opts += [f"{k}={v!r}" for k, v in TINY if k not in ("runtime.num_threads",)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tools/train.py"), str(DEMO), "--work-dir", str(wd), "--cfg-options", *opts]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (wd / "train.log").read_text()
    assert "device cpu x 2" in log and "batch 16 x 2 process(es) x 2 accumulate_steps = 64 per step" in log
    assert "auto_scale_lr: lr 0.1 = optimizer.lr 0.05 x total batch 64" in log      # 0.05 x 64 / 32
    assert "runtime.sync_bn: SyncBatchNorm runs on CUDA only" in log
    assert "DDP check: parameters identical on the 2 ranks" in log
    final = re.search(r"final val top1: ([0-9.]+) \((\d+) images\)", proc.stdout)
    assert final and int(final.group(2)) == 450
    ckpt = load_checkpoint(wd / "latest.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 4)
    assert ckpt["scheduler"]["base_lrs"][0] == pytest.approx(0.1)
    single = evaluate_checkpoint(load_config(wd / "config.py"), get_task("classification"), wd / "latest.pth",
                                 split="val")
    assert f"{single['top1']:.4f}" == final.group(1)
