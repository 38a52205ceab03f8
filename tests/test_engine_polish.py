"""Issue #24 polish of the engine: the evaluation progress bar, the trainer's final evaluation reusing the last
epoch's results when nothing changed, and the short phase-mismatch warning of ``checkpoint_phase``."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import pce.engine.trainer as trainer_mod
from pce.engine.evaluation import build_eval_datasets, evaluate_checkpoint, evaluate_model
from pce.engine.trainer import Trainer
from pce.tasks import get_task

from _faults_util import REPO, tiny_cfg

TEST_SPLIT = (("data.test.name", "digits"), ("data.test.kwargs.size", 8))


@pytest.fixture
def eval_calls(monkeypatch):
    """The splits' sizes of every ``evaluate_model`` call the trainer makes, in order."""
    calls = []
    real = trainer_mod.evaluate_model

    def counted(model, task, cfg, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return real(model, task, cfg, dataset, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "evaluate_model", counted)
    return calls


def _scalars(results):
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and k != "split"}


def test_progress_bar_on_stderr_only_when_asked(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "wd", ("data.eval_batch_size", 100), ("runtime.progress_bar", True))
    task = get_task("classification")
    ds = build_eval_datasets(cfg, task, ("val",))["val"]
    model = task.build_model(cfg)
    total = math.ceil(len(ds) / 100)  # by hand: the batches of the sequential loader
    assert total > 1
    capsys.readouterr()
    forced = evaluate_model(model, task, cfg, ds, torch.device("cpu"), progress=True, desc="eval val")
    err = capsys.readouterr().err
    assert f"eval val:   0%|" in err and f" 0/{total} [" in err and "batch/s" in err, err  # tqdm redraws ~10/s
    off = evaluate_model(model, task, cfg, ds, torch.device("cpu"), progress=False)
    assert capsys.readouterr().err == ""
    # the default follows runtime.progress_bar and tqdm's terminal check: stderr captured here, so no bar
    evaluate_model(model, task, cfg, ds, torch.device("cpu"))
    assert capsys.readouterr().err == ""
    assert forced == off  # the bar changes nothing in the results


def test_final_reuses_the_last_val_without_a_test_split(tmp_path, eval_calls, caplog):
    cfg = tiny_cfg(tmp_path / "wd", epochs=2, iters=2)
    with caplog.at_level(logging.INFO, logger="pce"):
        out = Trainer(cfg, get_task("classification")).train()
    val_size = eval_calls[0]
    assert eval_calls == [val_size, val_size]  # one per epoch, none for "final"
    assert "final val: the results of epoch 2's evaluation" in caplog.text
    ref = evaluate_checkpoint(cfg, get_task("classification"), tmp_path / "wd" / "latest.pth", split="val")
    assert out["final"]["split"] == "val" and _scalars(out["final"]) == _scalars(ref)
    # a resumed finished run has no evaluation of its own: it evaluates, with the same numbers
    eval_calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pce"):
        again = Trainer(cfg, get_task("classification"), resume=True).train()
    assert eval_calls == [val_size]
    assert "final val: evaluating the weights of epoch 2" in caplog.text
    assert _scalars(again["final"]) == _scalars(ref)


def test_final_evaluates_the_test_split_and_after_changed_weights(tmp_path, eval_calls):
    cfg = tiny_cfg(tmp_path / "wd", *TEST_SPLIT, ("runtime.ema", 0.5), epochs=2, iters=2)
    out = Trainer(cfg, get_task("classification")).train()
    assert len(eval_calls) == 3  # val, val, then the test split
    ref = evaluate_checkpoint(cfg, get_task("classification"), tmp_path / "wd" / "latest.pth", split="test")
    assert out["final"]["split"] == "test" and _scalars(out["final"]) == _scalars(ref)

    # weights changed after the last val (a hook nudging a BatchNorm buffer): evaluated again
    def nudge(trainer, event):
        if event == "after_epoch" and trainer.epoch == 2:
            bn = next(m for m in trainer.eval_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_mean.add_(0.0)

    eval_calls.clear()
    cfg2 = tiny_cfg(tmp_path / "wd2", epochs=2, iters=2)
    Trainer(cfg2, get_task("classification"), hooks=[nudge]).train()
    assert len(eval_calls) == 3


def test_phase_mismatch_warning_is_one_short_line(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path / "wd", epochs=2, iters=1)
    Trainer(cfg, get_task("classification")).train()  # saved in phase 'route' (keys_trainable False)
    other = tiny_cfg(tmp_path / "x", epochs=2, phases=[dict(name="tune", epochs=-1, keys_trainable=True)])
    with caplog.at_level(logging.WARNING, logger="pce"):
        evaluate_checkpoint(other, get_task("classification"), tmp_path / "wd" / "latest.pth", split="val")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["evaluating in the checkpoint's phase 'route' (the config's schedule puts epoch 2 in phase "
                        "'tune'): keys_trainable False here, True in the config"]


def test_detection_summary_mentions_masks():
    task = get_task("detection")
    masks = torch.zeros(3, 1, 6, 5, dtype=torch.uint8)
    masks[0, 0, :2, :3] = 1   # 6 pixels
    masks[1, 0, :, :] = 1     # 30 pixels, scored below the threshold
    masks[2, 0, 5, :] = 1     # 5 pixels
    out = {"boxes": torch.tensor([[0., 0., 3., 2.], [0., 0., 5., 6.], [0., 5., 5., 6.]]),
           "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.9, 0.2, 0.6]), "masks": masks}
    s = task.summarize(out, ["cat", "dog"], score_thr=0.5)
    assert s["names"] == ["cat", "dog"] and s["mask_pixels"] == [6, 5] and s["objects"] == "2 objects with masks"
    plain = task.summarize({k: v for k, v in out.items() if k != "masks"}, ["cat", "dog"], score_thr=0.5)
    assert set(plain) == {"boxes", "labels", "scores", "names"}


def test_detection_export_wording_names_the_head(monkeypatch, capsys):
    import pce.tasks.export_targets as et
    from pce.engine import load_config
    from pce.tasks.detection import build_detector

    cfg = load_config(REPO / "configs/demo_det_pce.py")
    model = build_detector("pce_tiny", arch="retinanet", num_classes=3, fpn_channels=32, min_size=64, max_size=80,
                           backbone_overrides=dict(num_experts=2)).eval()
    assert et.detector_name(model) == "RetinaNet"
    monkeypatch.setattr(et, "whole_detector", lambda model, images: (None, "data-dependent shapes"))
    module, _, info = et.detection_export_target(model, cfg, "model", (64, 80))
    note = capsys.readouterr().out
    assert module is model.backbone and "Faster R-CNN" not in note + info["exported"]
    assert "the whole detector (RetinaNet) does not export" in note and "(RetinaNet)" in info["exported"]


def test_trainer_validation_bar_follows_runtime_progress_bar(tmp_path, monkeypatch, capsys):
    """The trainer's validation bar: on with runtime.progress_bar when stderr is a terminal, never in logs."""
    cfg = tiny_cfg(tmp_path / "wd", ("runtime.progress_bar", True), epochs=1, iters=1)
    capsys.readouterr()
    Trainer(cfg, get_task("classification")).train()
    assert "eval val" not in capsys.readouterr().err  # stderr is not a terminal here
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    cfg = tiny_cfg(tmp_path / "wd2", ("runtime.progress_bar", True), epochs=1, iters=1)
    Trainer(cfg, get_task("classification")).train()
    assert "eval val:   0%|" in capsys.readouterr().err
