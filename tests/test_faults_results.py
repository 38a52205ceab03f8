"""Issue #16, silently wrong results (items 5-7, 10, 11, 13): evaluation in the checkpoint's phase, finite
checkpoints, pretrained-weight reports, empty splits, flags without effect, the demo data never deleting files."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, atomic_save, evaluate_checkpoint, load_checkpoint, load_config
from pce.engine.errors import NonFiniteStateError, PCEError
from pce.tasks import get_task

from _faults_util import REPO, demo_voc, error_line, load_tool, tiny_cfg


def test_eval_in_the_checkpoints_phase(tmp_path, caplog):
    """5. A checkpoint saved in the 'stabilise' phase is evaluated in it even when the config says otherwise."""
    wd = tmp_path / "wd"

    def keep_epoch1(trainer, event):
        if event == "after_epoch" and trainer.epoch == 1:
            shutil.copyfile(wd / "latest.pth", tmp_path / "epoch1.pth")

    Trainer(tiny_cfg(wd, ("runtime.checkpoint_interval", 1), epochs=2, iters=2), get_task("classification"),
            hooks=[keep_epoch1]).train()
    val = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    measured = next(r for r in val if r["type"] == "val" and r["epoch"] == 1)
    other = tiny_cfg(tmp_path / "x", epochs=2, phases=[dict(name="route", epochs=-1, keys_trainable=False)])
    with caplog.at_level(logging.WARNING, logger="pce"):
        res = evaluate_checkpoint(other, get_task("classification"), tmp_path / "epoch1.pth", split="val")
    assert res["top1"] == measured["top1"]
    assert "checkpoint's phase 'stabilise'" in caplog.text and "phase 'route'" in caplog.text


def test_nonfinite_buffers_are_never_saved_or_evaluated(tmp_path, capsys):
    """6. A NaN batch-norm buffer stops the run before it is saved; eval refuses a NaN checkpoint."""
    wd = tmp_path / "wd"

    def poison(trainer, event):
        if event == "after_step" and trainer.iteration == 3:  # epoch 2; the loss stays finite (batch statistics)
            bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var[0] = float("nan")

    trainer = Trainer(tiny_cfg(wd, epochs=2, iters=2), get_task("classification"), hooks=[poison])
    with pytest.raises(NonFiniteStateError, match="running_var"):
        trainer.train()
    for name in ("latest.pth", "best.pth"):
        ckpt = load_checkpoint(wd / name)
        assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values()
                                          if t.is_floating_point())
    bad = load_checkpoint(wd / "latest.pth")
    key = next(k for k in bad["model"] if k.endswith("running_mean"))
    bad["model"][key][0] = float("inf")
    atomic_save(bad, tmp_path / "nan.pth")
    with pytest.raises(NonFiniteStateError, match=key.replace(".", r"\.")):
        evaluate_checkpoint(tiny_cfg(wd), get_task("classification"), tmp_path / "nan.pth", split="val")
    cfg_path = tmp_path / "cfg.py"
    shutil.copyfile(wd / "config.py", cfg_path)
    assert load_tool("eval").main([str(cfg_path), "--checkpoint", str(tmp_path / "nan.pth")]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path / 'nan.pth'}: 1 non-finite tensor(s): {key}")


def test_pretrained_reports_keys_and_fails_on_no_match(tmp_path, caplog):
    """7. model.pretrained that matches nothing is an error; a partial match names the missing / unexpected keys."""
    atomic_save({"model": {"encoder.conv.weight": torch.randn(3, 3)}}, tmp_path / "other.pth")
    cfg = tiny_cfg(tmp_path / "wd", ("model.pretrained", str(tmp_path / "other.pth")), epochs=1, iters=1)
    with pytest.raises(PCEError, match="none of its 1 tensors matches") as e:
        Trainer(cfg, get_task("classification"))
    assert str(e.value).startswith(f"model.pretrained={tmp_path / 'other.pth'}")
    model = get_task("classification").build_model(cfg)
    state = model.state_dict()
    dropped = next(iter(state))
    state.pop(dropped)
    state["extra.weight"] = torch.zeros(1)
    atomic_save({"model": state}, tmp_path / "partial.pth")
    with caplog.at_level(logging.INFO, logger="pce"):
        Trainer(tiny_cfg(tmp_path / "wd2", ("model.pretrained", str(tmp_path / "partial.pth")), epochs=1, iters=1),
                get_task("classification")).lock.release()
    assert f"{len(state) - 1} of {len(state)} model tensors matched" in caplog.text
    assert f"1 missing ({dropped})" in caplog.text and "1 unexpected (extra.weight)" in caplog.text


def _voc_det_cfg(root: Path, work_dir: Path, *extra):
    from pce.datasets.demo_voc import DEMO_CLASSES

    return load_config(REPO / "configs/demo_det_pce.py", [
        ("data.root", str(root)), ("runtime.work_dir", str(work_dir)), ("data.num_workers", 0),
        ("data.train.kwargs.demo", False), ("data.val.kwargs.demo", False),
        ("data.train.kwargs.classes", list(DEMO_CLASSES)), ("data.val.kwargs.classes", list(DEMO_CLASSES)),
        ("runtime.progress_bar", False), ("runtime.tensorboard", False), *extra])


def test_empty_validation_split_is_an_error_before_training(tmp_path):
    """10. An empty val split fails before anything is trained (or written), naming the split."""
    voc = demo_voc(tmp_path / "data")
    (voc / "ImageSets/Main/empty.txt").write_text("")
    with pytest.raises(PCEError, match=r"data\.val \(voc_detection\): the split holds no samples"):
        Trainer(_voc_det_cfg(tmp_path / "data", tmp_path / "wd", ("data.val.kwargs.image_set", "empty")),
                get_task("detection"))
    assert not list((tmp_path / "wd").glob("*.pth"))


def test_flags_without_effect_and_dense_twins(tmp_path):
    """11. attention=True on a backbone without attention blocks is an error naming the phase; the stock configs
    have none, and every *_pce config has its *_dense twin; every *_patchmoe config (model.convert) is its *_dense
    twin plus the conversion: the same model and data but for model.convert."""
    phases = [dict(name="a", epochs=1), dict(name="b", epochs=-1, attention=True)]
    trainer = Trainer(tiny_cfg(tmp_path / "wd", epochs=2, iters=1, phases=phases), get_task("classification"))
    with pytest.raises(PCEError, match=r"phases\.1\.attention: attention=True in phase 'b' has no effect"):
        trainer.train()
    assert not (tmp_path / "wd/latest.pth").exists()
    from pce.engine import PhaseController, build_phases

    for name in ("mnist_cls_pce", "cifar10_cls_pce", "tinyimagenet_cls_pce", "mnist_cls_dense", "cifar10_cls_dense",
                 "tinyimagenet_cls_dense"):
        cfg = load_config(REPO / "configs" / f"{name}.py")
        model = get_task(cfg.task).build_model(cfg)
        PhaseController(build_phases(cfg.phases, cfg.schedule.epochs)).check_effects(model)  # no error
    pce_cfgs = {p.name[:-len("_pce.py")] for p in (REPO / "configs").glob("*_pce.py")}
    dense_cfgs = {p.name[:-len("_dense.py")] for p in (REPO / "configs").glob("*_dense.py")}
    assert pce_cfgs <= dense_cfgs, sorted(pce_cfgs - dense_cfgs)
    moe_cfgs = {p.name[:-len("_patchmoe.py")] for p in (REPO / "configs").glob("*_patchmoe.py")}
    assert moe_cfgs and moe_cfgs <= dense_cfgs, sorted(moe_cfgs - dense_cfgs)
    for stem in sorted(moe_cfgs):
        moe, dense = (load_config(REPO / "configs" / f"{stem}_{kind}.py") for kind in ("patchmoe", "dense"))
        assert moe.model.convert and {**moe.model, "convert": []} == dict(dense.model), stem
        assert moe.data == dense.data, stem


def test_demo_data_never_deletes_user_files(tmp_path):
    """13. Regenerating the demo set with other options refuses to delete a file the user added; the demo set is
    only written into a VOCdevkit of its own; splits asking for different demo sets are an error."""
    from pce.datasets.demo_voc import ensure_demo_voc
    from pce.tasks.common import dataset_kwargs

    voc = demo_voc(tmp_path / "demo")
    mine = voc / "JPEGImages" / "my_photo.jpg"
    mine.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="my_photo.jpg"):
        ensure_demo_voc(tmp_path / "demo", num_train=4, num_val=2, image_size=32)
    assert mine.read_bytes() == b"user data"
    (tmp_path / "real/VOCdevkit/VOC2012").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="VOC2012"):
        ensure_demo_voc(tmp_path / "real", num_train=2, num_val=1, image_size=32)
    assert not (tmp_path / "real/VOCdevkit/VOC2007").exists()
    cfg = load_config(REPO / "configs/demo_det_pce.py", [("data.root", str(tmp_path / "demo")),
                                                         ("data.val.kwargs.demo", {"num_val": 7})])
    with pytest.raises(PCEError, match=r"data\.train\.kwargs\.demo: .* differs from data\.val\.kwargs\.demo"):
        dataset_kwargs(cfg, "train")
