"""Issue #16, data loss (items 1-4): work-dir lock and refusal, best.pth before latest.pth, config.py kept on a
failed resume, no iterations skipped after a mid-epoch stop."""
from __future__ import annotations

import logging

import pytest
import torch

from pce.engine import Trainer, load_checkpoint
from pce.engine.checkpoint import CheckpointManager
from pce.engine.errors import PCEError, WorkDirError
from pce.tasks import get_task

from _faults_util import cli_options, error_line, load_tool, tiny_cfg


def test_work_dir_lock_and_refusal(tmp_path, capsys):
    """1. A second run into a busy work dir, or a fresh run into one with checkpoints, is refused naming it."""
    wd = tmp_path / "wd"
    running = Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification"))  # holds the work dir
    with pytest.raises(WorkDirError, match="in use by another training") as e:
        Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification"))
    assert str(wd) in str(e.value)
    running.lock.release()
    (wd / ".lock").write_text("99999999\n")  # a stale lock file of a dead process does not block
    Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification")).train()
    best = (wd / "best.pth").read_bytes()
    with pytest.raises(WorkDirError, match="holds the checkpoints of a previous run") as e:
        Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification"))
    assert str(wd) in str(e.value) and "--resume" in str(e.value)
    assert (wd / "best.pth").read_bytes() == best
    # the command line: one line naming the folder, exit status 1; --force replaces the run
    assert load_tool("train").main(["configs/demo_cls_digits.py", *cli_options(wd)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {wd}: holds the checkpoints") and "--force" in line
    assert (wd / "best.pth").read_bytes() == best
    assert load_tool("train").main(["configs/demo_cls_digits.py", "--force", *cli_options(wd)]) == 0



def test_fresh_run_sets_an_earlier_attempts_records_aside(tmp_path):
    """A fresh run (no --resume) into a work dir where an earlier attempt left records (stopped before its first
    checkpoint, or replaced with --force) starts a record of its own: the old metrics.jsonl, train.log and tb/ move
    to previous/<k>/ unchanged, and the new metrics.jsonl holds this run's records only (before: appended, so the
    earlier attempt's test record made a run that had just started look finished)."""
    import json

    wd = tmp_path / "wd"
    (wd / "tb").mkdir(parents=True)
    old = '{"type": "train", "epoch": 1, "iter": 50, "loss": 9.0, "time": 1.0}\n{"type": "test", "epoch": 9, "top1": 0.99}\n'
    (wd / "metrics.jsonl").write_text(old)
    (wd / "train.log").write_text("the earlier attempt\n")
    (wd / "tb" / "events.old").write_bytes(b"tb")
    Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification")).train()
    assert (wd / "previous/1/metrics.jsonl").read_text() == old
    assert (wd / "previous/1/train.log").read_text() == "the earlier attempt\n"
    assert (wd / "previous/1/tb/events.old").read_bytes() == b"tb"
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["type"] == "test"] and all(r.get("top1") != 0.99 for r in records)
    assert "the earlier attempt" not in (wd / "train.log").read_text() and not (wd / "tb/events.old").exists()
    first = (wd / "metrics.jsonl").read_text()
    assert load_tool("train").main(["configs/demo_cls_digits.py", "--force", *cli_options(wd)]) == 0
    assert (wd / "previous/2/metrics.jsonl").read_text() == first          # the --force run's predecessor, kept
    assert (wd / "previous/1/metrics.jsonl").read_text() == old            # and the one before, untouched
    tests = [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines()) if r["type"] == "test"]
    assert len(tests) == 1

def test_best_written_before_latest_and_verified_on_resume(tmp_path, monkeypatch, caplog):
    """2. A kill between the two checkpoint writes never leaves latest.pth recording a best that best.pth lacks;
    resume verifies best.pth, and stale temp files are removed."""
    wd = tmp_path / "wd"
    cfg = tiny_cfg(wd, epochs=3, iters=1)
    trainer = Trainer(cfg, get_task("classification"))
    trainer._is_better = lambda value: True  # every evaluation is a new best: both files written every epoch
    writes = {"n": 0}
    real_save, real_copy = CheckpointManager.save, CheckpointManager.copy

    def counted(real):
        def write(self, *args, **kwargs):
            writes["n"] += 1
            if writes["n"] == 4:  # the second write of epoch 2: the process dies here
                raise KeyboardInterrupt("killed between the two checkpoint writes")
            return real(self, *args, **kwargs)
        return write

    monkeypatch.setattr(CheckpointManager, "save", counted(real_save))
    monkeypatch.setattr(CheckpointManager, "copy", counted(real_copy))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(CheckpointManager, "save", real_save)
    monkeypatch.setattr(CheckpointManager, "copy", real_copy)
    latest, best = load_checkpoint(wd / "latest.pth"), load_checkpoint(wd / "best.pth")
    assert best["epoch"] >= latest["best"]["epoch"]  # the recorded best's weights exist
    (wd / ".latest.pth.4242.tmp").write_bytes(b"x" * 1000)  # an interrupted save's temp file
    resumed = Trainer(cfg, get_task("classification"), resume=True)
    assert not (wd / ".latest.pth.4242.tmp").exists()
    assert resumed.best == load_checkpoint(wd / "best.pth")["best"]
    resumed.train()
    resumed.lock.release()
    # best.pth deleted: the resumed run says so and does not report a best whose weights are gone
    (wd / "best.pth").unlink()
    with caplog.at_level(logging.WARNING, logger="pce"):
        again = Trainer(tiny_cfg(wd, epochs=4, iters=1), get_task("classification"), resume=True)
    assert again.best["value"] is None and "best.pth is missing" in caplog.text
    again.lock.release()


def test_resume_with_other_model_keeps_config_py(tmp_path, capsys):
    """3. --resume with a different model config fails naming the saved config (config.json, the plain-data form
    read instead of executing config.py: issue #23) and leaves config.py and config.json unchanged."""
    wd = tmp_path / "wd"
    Trainer(tiny_cfg(wd, epochs=1, iters=1), get_task("classification")).train()
    saved = {n: (wd / n).read_text() for n in ("config.py", "config.json")}
    other = [dict(channels=12, depth=1, patch_size=4, stride=1), dict(channels=16, depth=1, patch_size=2, stride=2)]
    with pytest.raises(PCEError, match="different model config") as e:
        Trainer(tiny_cfg(wd, ("model.backbone_overrides.stages", other), epochs=2, iters=1),
                get_task("classification"), resume=True)
    assert str(e.value).startswith(str(wd / "config.json")) and "model.backbone_overrides.stages" in str(e.value)
    assert {n: (wd / n).read_text() for n in saved} == saved
    args = cli_options(wd, epochs=2)
    args += [f"model.backbone_overrides.stages={other!r}"]
    assert load_tool("train").main(["configs/demo_cls_digits.py", "--resume", *args]) == 1
    assert "config.json: --resume with a different model config" in error_line(capsys.readouterr().err)
    assert {n: (wd / n).read_text() for n in saved} == saved


def test_mid_epoch_stop_then_resume_skips_no_iteration(tmp_path):
    """4. schedule.max_iters stops inside an epoch; the resumed run trains that epoch's remaining iterations."""
    full = Trainer(tiny_cfg(tmp_path / "full", epochs=2, iters=3, phases=[]), get_task("classification"))
    full.train()
    first = Trainer(tiny_cfg(tmp_path / "split", ("schedule.max_iters", 2), epochs=2, iters=3, phases=[]),
                    get_task("classification"))
    first.train()
    ckpt = load_checkpoint(tmp_path / "split/latest.pth")
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 0 and ckpt["epoch_iter"] == 2
    resumed = Trainer(tiny_cfg(tmp_path / "split", epochs=2, iters=3, phases=[]), get_task("classification"),
                      resume=True)
    out = resumed.train()
    assert out["iterations"] == 6 and out["epochs"] == 2
    assert first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
