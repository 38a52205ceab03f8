"""Issue #23, pruning, config execution, resume, evaluation and expert surgery: nothing lost, nothing silently
wrong. Each test failed on the code before the fix."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, atomic_save, evaluate_checkpoint, load_checkpoint, load_config
from pce.engine.checkpoint import CheckpointManager
from pce.engine.config import config_to_dict, to_plain
from pce.engine.errors import run_cli
from pce.engine.evaluation import load_trained_weights
from pce.moe.surgery import duplicate_expert, pce_layers
from pce.tasks import get_task

from _faults_util import DEMO, cli_options, error_line, load_tool, tiny_cfg, tiny_overrides

LAYER = "backbone.stages.0.layers.0"  # the first PCE layer of the tiny model


def tool(name: str, *argv: str) -> int:
    t = load_tool(name)
    args = t.parse_args([str(a) for a in argv])
    return run_cli(lambda: t.main(args), debug=False)


@contextlib.contextmanager
def pce_log(caplog, level=logging.WARNING):
    """caplog for the ``pce`` logger, which a Trainer stops propagating to the root logger (setup_logger)."""
    log = logging.getLogger("pce")
    caplog.clear()
    caplog.handler.setLevel(level)
    old = log.level
    log.setLevel(level)
    log.addHandler(caplog.handler)
    try:
        yield
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(old)


def options(work_dir: Path) -> list:
    """``--cfg-options`` values of the tiny run (after the flag)."""
    return [f"{k}={v!r}" for k, v in tiny_overrides(work_dir)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny digits run (config.py, best.pth, latest.pth); tests that change it work on a copy."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("faults_tools") / "run"
    Trainer(tiny_cfg(wd, epochs=2, iters=2), get_task("classification")).train()
    return wd


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def prune(ckpt: Path, out: Path, *extra: str) -> int:
    return tool("prune_experts", DEMO, "--checkpoint", ckpt, "--num", "32", "--remove", f"{LAYER}:0",
                "--out", out, *extra, "--cfg-options", *options(ckpt.parent))


# ------------------------------------------------------------------------------------------------ item 1
def test_prune_never_overwrites_a_file_or_the_runs_own_checkpoints(run, tmp_path, capsys):
    """1. --out refuses an existing file without --force and the run's own latest.pth / best.pth (even where
    the file is missing); a new --out is written atomically."""
    wd = copy_run(run, tmp_path / "wd")
    latest = (wd / "latest.pth").read_bytes()
    assert prune(wd / "latest.pth", wd / "latest.pth") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {wd / 'latest.pth'}: ") and "--force" in line
    assert (wd / "latest.pth").read_bytes() == latest
    (wd / "best.pth").unlink()  # the run's own name is refused even where the file is gone
    assert prune(wd / "latest.pth", wd / "best.pth") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {wd / 'best.pth'}: ") and "--resume" in line
    assert not (wd / "best.pth").exists()
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"precious")
    assert prune(wd / "latest.pth", mine) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {mine}: exists") and "--force" in line
    assert mine.read_bytes() == b"precious"
    assert prune(wd / "latest.pth", mine, "--force") == 0
    assert load_checkpoint(mine)["expert_structure"] == {LAYER: [[1, 2, 3]]}
    assert prune(wd / "latest.pth", tmp_path / "new" / "pruned.pth") == 0
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["pruned.pth"]  # no temp file left


@pytest.mark.parametrize("flag,value", [("--entropy-above", "-1"), ("--entropy-above", "nan"),
                                        ("--usage-below", "1.5"), ("--usage-below", "nan"),
                                        ("--duplicate-above", "-0.5"), ("--jitter", "-0.1"), ("--jitter", "inf"),
                                        ("--num", "0")])
def test_prune_numeric_flags_are_range_checked(run, tmp_path, capsys, flag, value):
    """1. A number out of its range (or NaN) is one line naming the flag and the valid range; nothing written."""
    out = tmp_path / "pruned.pth"
    assert tool("prune_experts", DEMO, "--checkpoint", run / "latest.pth", flag, value, "--out", out,
                "--cfg-options", *options(run)) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {flag}: ") and "(" in line and not out.exists()


# ------------------------------------------------------------------------------------------------ item 2
def test_resume_and_report_never_execute_the_work_dirs_config(run, tmp_path, capsys, caplog):
    """2. The work dir holds config.json (plain data, validated on reading); --resume and tools/report.py read
    it and never execute the work dir's config.py; an old work dir with config.py only: report asks for
    --config, resume warns and goes on with the config given."""
    wd = copy_run(run, tmp_path / "wd")
    marker = tmp_path / "executed"
    trap = f"open({str(marker)!r}, 'w').write('config.py was executed')\n" + (wd / "config.py").read_text()
    (wd / "config.py").write_text(trap)
    assert tool("report", wd, "--num", "16", "--images", "1") == 0 and (wd / "report.html").is_file()
    assert not marker.exists()
    Trainer(tiny_cfg(wd, epochs=3, iters=1), get_task("classification"), resume=True).train()
    assert not marker.exists()
    from pce.engine.config import load_saved_config  # new in issue #23

    saved = load_saved_config(wd / "config.json")  # plain data that round-trips through the validation
    expected = tiny_cfg(wd, epochs=3, iters=1)
    assert to_plain(config_to_dict(saved)) == to_plain(config_to_dict(expected))
    # an old work dir: config.py only
    (wd / "config.json").unlink()
    (wd / "config.py").write_text(trap)
    assert tool("report", wd) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {wd / 'config.py'}: ") and "--config CONFIG" in line and not marker.exists()
    assert tool("report", wd, "--config", DEMO, "--num", "16", "--images", "1", "--cfg-options", *options(wd)) == 0
    assert not marker.exists()
    with pce_log(caplog):
        again = Trainer(tiny_cfg(wd, epochs=4, iters=1), get_task("classification"), resume=True)
    assert "could not be read safely" in caplog.text and str(wd / "config.py") in caplog.text
    again.train()
    assert not marker.exists() and (wd / "config.json").is_file()  # written again once the checkpoint loaded


# ------------------------------------------------------------------------------------------------ item 3
def test_resume_after_a_kill_during_the_first_save(tmp_path, monkeypatch, caplog, capsys):
    """3. Killed after best.pth, before latest.pth: a best.pth holding the full training state
    (runtime.best_weights_only=False) is resumed from and the run continues exactly; a weights-only best.pth (the
    default since issue #24) is named with what to do, and doing it loads every tensor."""
    task = get_task("classification")
    full_best = ("runtime.best_weights_only", False)
    full = Trainer(tiny_cfg(tmp_path / "full", full_best, epochs=2, iters=2), task)
    full.train()
    wd = tmp_path / "wd"
    first = Trainer(tiny_cfg(wd, full_best, epochs=2, iters=2), task)

    def killed(self, src, name):
        raise KeyboardInterrupt("killed between best.pth and latest.pth")

    monkeypatch.setattr(CheckpointManager, "copy", killed)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.undo()
    assert (wd / "best.pth").is_file() and not (wd / "latest.pth").exists()
    shutil.copytree(wd, tmp_path / "cli", ignore=shutil.ignore_patterns(".lock"))
    with pce_log(caplog):
        resumed = Trainer(tiny_cfg(wd, full_best, epochs=2, iters=2), task, resume=True)
    assert str(wd / "best.pth") in caplog.text and resumed.epoch == 1
    resumed.train()
    assert first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_tool("train").main([str(DEMO), "--resume", *cli_options(tmp_path / "cli", epochs=2, iters=2)]) == 0
    # a weights-only best.pth (the default): the error names both files and what to do
    lean = tmp_path / "lean"
    real_save = CheckpointManager.save

    def killed_at_latest(self, state, name="latest.pth"):
        if name == "latest.pth":
            raise KeyboardInterrupt("killed between best.pth and latest.pth")
        return real_save(self, state, name)

    monkeypatch.setattr(CheckpointManager, "save", killed_at_latest)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(lean, epochs=2, iters=2), task).train()
    monkeypatch.undo()
    assert (lean / "best.pth").is_file() and not (lean / "latest.pth").exists()
    assert "optimizer" not in load_checkpoint(lean / "best.pth")
    capsys.readouterr()
    assert load_tool("train").main([str(DEMO), "--resume", *cli_options(lean)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {lean / 'latest.pth'}: does not exist")
    assert str(lean / "best.pth") in line and f"model.pretrained={lean / 'best.pth'}" in line
    with pce_log(caplog, logging.INFO):  # doing what it says: every tensor of best.pth loads
        again = Trainer(tiny_cfg(tmp_path / "again", ("model.pretrained", str(lean / "best.pth"))), task)
    again.lock.release()
    n = len(again.model.state_dict())
    assert f"{n} of {n} model tensors matched" in caplog.text and "missing" not in caplog.text


# ------------------------------------------------------------------------------------------------ item 4
def test_eval_on_the_train_split_uses_the_evaluation_transform(run, tmp_path):
    """4. --split train scores the training images through the evaluation transform, not the augmentation."""
    task = get_task("classification")
    ckpt = run / "latest.pth"
    got = evaluate_checkpoint(tiny_cfg(run), task, ckpt, split="train")
    plain = evaluate_checkpoint(tiny_cfg(run, ("data.train.transform.kwargs.train", False)), task, ckpt,
                                split="train")
    assert json.dumps(got, default=str) == json.dumps(plain, default=str)
    out = tmp_path / "train.json"
    assert load_tool("eval").main([str(DEMO), "--checkpoint", str(ckpt), "--split", "train", "--out", str(out),
                                   "--cfg-options", *options(run)]) == 0
    assert json.loads(out.read_text())["top1"] == plain["top1"]


# ------------------------------------------------------------------------------------------------ item 5
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A digits checkpoint of the demo config itself (its cosine top-1 router, K-Means keys, threshold)."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("digits_dup")
    cfg = load_config(DEMO, [("runtime.work_dir", str(wd)), ("schedule.epochs", 2), ("schedule.iters_per_epoch", 8),
                             ("phases.0.epochs", 1), ("phases.1.epochs", 1), ("runtime.kmeans_init_batches", 2),
                             ("runtime.tensorboard", False), ("runtime.progress_bar", False)])
    Trainer(cfg, get_task("classification")).train()
    return wd / "latest.pth"


def _trained(ckpt: Path, *extra):
    cfg = load_config(DEMO, [("runtime.work_dir", str(ckpt.parent)), *extra])
    task = get_task("classification")
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, ckpt)
    ds = task.build_datasets(cfg, ("val",))["val"]
    x = torch.stack([ds[i][0] for i in range(256)])
    return model.eval(), x


def _busy_expert(model, x, layer: str) -> int:
    from pce.analysis import routing_maps

    return int(torch.bincount(routing_maps(model, x)[layer].expert.flatten().clamp_min(0)).argmax())


def test_duplicate_expert_on_a_trained_digits_checkpoint(digits, caplog):
    """5. The real case: the demo router (cosine, top-1, not renormalised) cannot keep the outputs with a copy
    (the kept weight is a softmax probability over E + 1 experts): duplicate_expert says so (exact=True refuses);
    with renormalised top-1 routing every logit of 256 images is kept, with and without jitter."""
    model, x = _trained(digits)
    with torch.no_grad():
        ref = model(x)
    for layer in pce_layers(model):
        busy = _busy_expert(model, x, layer)
        with pce_log(caplog):
            dup = duplicate_expert(model, layer, busy, jitter=0.01)
        assert f"{layer}: duplicating expert {busy} changes the outputs" in caplog.text
        assert "renormalize" in caplog.text
        with torch.no_grad():
            assert not torch.equal(dup(x), ref)  # what the warning says
        with pytest.raises(ValueError, match="changes the outputs"):
            duplicate_expert(model, layer, busy, exact=True)
    model, x = _trained(digits, ("model.backbone_overrides.router_kwargs", {"renormalize": True}))
    with torch.no_grad():
        ref = model(x)
    for layer in pce_layers(model):
        busy = _busy_expert(model, x, layer)
        for jitter in (0.0, 0.01):
            with pce_log(caplog):
                dup = duplicate_expert(model, layer, busy, jitter=jitter, exact=True)
            assert "changes the outputs" not in caplog.text
            with torch.no_grad():
                out = dup(x)
            assert torch.equal(out.argmax(-1), ref.argmax(-1)) and torch.allclose(out, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ item 6
def test_pretrained_pruned_checkpoint_loads_every_tensor(run, tmp_path, caplog):
    """6. model.pretrained of a pruned checkpoint replays its expert structure: every tensor matches; the run's
    checkpoints record the structure, so --resume (even without model.pretrained) and evaluation load them."""
    pruned = tmp_path / "pruned.pth"
    assert prune(run / "latest.pth", pruned) == 0
    task = get_task("classification")
    wd = tmp_path / "ft"
    with pce_log(caplog, logging.INFO):
        ft = Trainer(tiny_cfg(wd, ("model.pretrained", str(pruned)), epochs=1, iters=1), task)
    n = len(ft.model.state_dict())
    assert f"{n} of {n} model tensors matched" in caplog.text and "missing" not in caplog.text
    assert pce_layers(ft.model)[LAYER].num_experts == 3
    saved = load_checkpoint(pruned)["model"]
    assert set(saved) == set(ft.model.state_dict())
    for k, v in ft.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    ft.train()
    assert load_checkpoint(wd / "latest.pth")["expert_structure"] == {LAYER: [[1, 2, 3]]}
    resumed = Trainer(tiny_cfg(wd, epochs=2, iters=1), task, resume=True)
    assert pce_layers(resumed.model)[LAYER].num_experts == 3
    resumed.train()
    res = evaluate_checkpoint(tiny_cfg(wd), task, wd / "latest.pth", split="val")
    assert math.isfinite(res["top1"])
