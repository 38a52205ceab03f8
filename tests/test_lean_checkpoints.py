"""Issue #24, lean checkpoints: best.pth holds the (EMA) weights and the metadata loaders read, latest.pth and
epoch_N.pth the full resumable state, runtime.max_keep_ckpts removes the oldest epoch_N.pth this run wrote (only
after the new one was written, never best.pth / latest.pth / a user's file)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, load_checkpoint
from pce.engine.checkpoint import CheckpointManager, is_training_state
from pce.engine.errors import PCEError
from pce.engine.evaluation import load_trained_weights
from pce.tasks import get_task

from _faults_util import tiny_cfg

EMA = ("runtime.ema", 0.9)
EPOCHS = (("runtime.save_epoch_ckpts", True), ("runtime.max_keep_ckpts", 2))


def _ema_weights(ckpt: dict) -> dict:
    """The model weights inside an ``AveragedModel`` state dict (by hand: ``module.`` prefix, no ``n_averaged``)."""
    return {k.split(".", 1)[1]: v for k, v in ckpt["ema"].items() if k != "n_averaged"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """3 tiny epochs with EMA, a new best at every evaluation, epoch_N.pth kept 2 at most; a user's files beside."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("lean") / "run"
    wd.mkdir()
    (wd / "epoch_0.pth").write_bytes(b"a user's file with a checkpoint's name")
    (wd / "epoch_1_backup.pth").write_bytes(b"another")
    trainer = Trainer(tiny_cfg(wd, EMA, *EPOCHS, ("runtime.checkpoint_interval", 1), epochs=3, iters=2),
                      get_task("classification"), force=True)
    trainer._is_better = lambda value: True
    trainer.train()
    return wd


def test_best_holds_the_ema_weights_and_the_metadata_only(run):
    best, latest = load_checkpoint(run / "best.pth"), load_checkpoint(run / "latest.pth")
    assert is_training_state(latest) and not is_training_state(best)
    assert set(best) == {"model", "weights", "epoch", "epoch_iter", "iteration", "best", "phase", "expert_structure",
                         "config", "meta"}
    assert best["weights"] == "ema" and best["epoch"] == latest["epoch"] == 3 and best["best"] == latest["best"]
    assert best["phase"] == latest["phase"] and best["config"] == latest["config"]
    ema = _ema_weights(latest)
    assert set(best["model"]) == set(ema) == set(latest["model"])
    for k, v in best["model"].items():
        assert torch.equal(v, ema[k]), k
    assert any(not torch.equal(ema[k], latest["model"][k]) for k in ema)  # the EMA, not the raw weights
    assert (run / "best.pth").stat().st_size * 2 < (run / "latest.pth").stat().st_size


def test_best_loads_as_the_full_checkpoints_ema(run):
    """tools/eval.py's path on best.pth gives the outputs of the EMA weights of latest.pth, loaded by hand."""
    cfg, task = tiny_cfg(run), get_task("classification")
    lean = task.build_model(cfg)
    load_trained_weights(lean, cfg, run / "best.pth")
    ref = task.build_model(cfg)
    ref.load_state_dict(_ema_weights(load_checkpoint(run / "latest.pth")))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(lean.eval()(x), ref.eval()(x))


def test_max_keep_ckpts_removes_only_the_oldest_epochs_of_the_run(run):
    names = sorted(p.name for p in run.glob("*.pth"))
    assert names == ["best.pth", "epoch_0.pth", "epoch_1_backup.pth", "epoch_2.pth", "epoch_3.pth", "latest.pth"]
    assert (run / "epoch_0.pth").read_bytes() == b"a user's file with a checkpoint's name"
    e3, latest = load_checkpoint(run / "epoch_3.pth"), load_checkpoint(run / "latest.pth")
    assert is_training_state(e3) and e3["epoch"] == 3 and (run / "epoch_3.pth").read_bytes() == (
        run / "latest.pth").read_bytes()
    assert latest["epoch_ckpts"] == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]  # recorded before the removal
    assert load_checkpoint(run / "epoch_2.pth")["epoch"] == 2


def test_removal_waits_for_the_new_file_and_resumes(run, tmp_path, monkeypatch):
    """A failed epoch_N.pth write deletes nothing; a resumed run knows the files its earlier part wrote."""
    wd = shutil.copytree(run, tmp_path / "wd", ignore=shutil.ignore_patterns(".lock"))
    cfg = tiny_cfg(wd, EMA, *EPOCHS, ("runtime.max_keep_ckpts", 1), epochs=5, iters=2)
    resumed = Trainer(cfg, get_task("classification"), resume=True)
    assert resumed.epoch_ckpts == ("epoch_1.pth", "epoch_2.pth", "epoch_3.pth")
    real_copy = CheckpointManager.copy

    def full_disk(self, src, name):
        if name == "epoch_4.pth":
            raise OSError("no space left on device (simulated)")
        return real_copy(self, src, name)

    monkeypatch.setattr(CheckpointManager, "copy", full_disk)
    with pytest.raises(OSError, match="simulated"):
        resumed.train()
    monkeypatch.undo()
    assert {p.name for p in wd.glob("epoch_*.pth")} == {"epoch_0.pth", "epoch_1_backup.pth", "epoch_2.pth",
                                                          "epoch_3.pth"}
    again = Trainer(cfg, get_task("classification"), resume=True)
    again.train()
    assert {p.name for p in wd.glob("epoch_*.pth")} == {"epoch_0.pth", "epoch_1_backup.pth", "epoch_5.pth"}
    assert load_checkpoint(wd / "latest.pth")["epoch"] == 5


def test_resume_from_a_weights_only_file_names_what_to_do(run, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(PCEError, match="holds weights only") as e:
        Trainer(tiny_cfg(wd, EMA, epochs=4, iters=2), get_task("classification"), resume=run / "best.pth")
    assert str(run / "best.pth") in str(e.value) and f"model.pretrained={run / 'best.pth'}" in str(e.value)
    assert not (wd / "config.json").exists()


def test_full_best_on_request(tmp_path, caplog):
    wd = tmp_path / "wd"
    with caplog.at_level(logging.WARNING, logger="pce"):
        Trainer(tiny_cfg(wd, EMA, ("runtime.best_weights_only", False), ("runtime.max_keep_ckpts", 3), epochs=1,
                         iters=1), get_task("classification")).train()
    assert "runtime.max_keep_ckpts=3 has no effect" in caplog.text
    best = load_checkpoint(wd / "best.pth")
    assert is_training_state(best) and best["ema"] is not None
    assert (wd / "best.pth").read_bytes() == (wd / "latest.pth").read_bytes()
    assert not list(wd.glob("epoch_*.pth"))
