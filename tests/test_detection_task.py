"""The detection task adapter (pce.tasks.detection.task) on a tiny generated demo VOC dataset, a short
Trainer run, and tools/infer.py + tools/browse_dataset.py in-process."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, load_config
from pce.engine.phases import find_backbones
from pce.tasks import get_task, list_tasks
from pce.tasks.detection import DetectionEvaluator, PCEFasterRCNN
from _faults_util import load_tool

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
task = "detection"
model = dict(backbone="pce_tiny", num_classes=5,
             head=dict(fpn_channels=32, representation_size=64, min_size=96, max_size=96, anchor_scale=4),
             input_shape=(3, 96, 96))
_demo = dict(num_train=4, num_val=2, image_size=96)
_tf = dict(name="voc_detection", kwargs=dict(min_size=96, max_size=96))
data = dict(root={root!r},
            train=dict(name="voc_detection", kwargs=dict(year="2007", image_set="train", demo=_demo), transform=_tf),
            val=dict(name="voc_detection", kwargs=dict(year="2007", image_set="val", demo=_demo), transform=_tf),
            batch_size=2, num_workers=0)
optimizer = dict(type="sgd", lr=0.01, momentum=0.9, grad_clip=5.0)
schedule = dict(epochs=2, lr_scheduler=dict(type="constant"))
phases = [dict(name="stabilise", epochs=1, router_override="uniform"), dict(name="route", epochs=-1)]
runtime = dict(work_dir={work!r}, device="cpu", kmeans_init_batches=1, tensorboard=False, progress_bar=False)
eval = dict(metric="AP50", mode="max")
"""


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("det_task")
    path = d / "det.py"
    path.write_text(CONFIG.format(root=str(d / "demo_voc"), work=str(d / "work")))
    return path


def test_adapter_build_train_predict_evaluate(cfg_path):
    assert "detection" in list_tasks()
    cfg = load_config(cfg_path)
    task = get_task("detection")
    model = task.build_model(cfg)
    assert isinstance(model, PCEFasterRCNN) and model.num_classes == 5
    ds = task.build_datasets(cfg)                                        # generates the demo data
    assert set(ds) == {"train", "val"} and len(ds["train"]) == 4 and len(ds["val"]) == 2
    batch = task.collate_fn([ds["train"][0], ds["train"][1]])
    assert task.batch_size(batch) == 2
    model.train()
    losses = task.train_step(model, batch, torch.device("cpu"))
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_router"} <= set(losses)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    # K-Means batches: what the backbone sees, so the PCEBackbone's init_keys can use them directly
    x = task.batch_images(batch)
    assert x.dim() == 4 and x.shape[0] == 2 and x.shape[-1] % model.pce_backbone.size_divisibility == 0
    assert find_backbones(model)[0].init_keys([x]) == 4
    model.eval()
    evaluator = task.build_evaluator(cfg, ds["val"])
    assert isinstance(evaluator, DetectionEvaluator) and evaluator.class_names == ["circle", "square", "triangle", "star"]
    vbatch = task.collate_fn([ds["val"][0], ds["val"][1]])
    evaluator.update(*task.predict(model, vbatch, torch.device("cpu")))
    res = evaluator.compute()
    assert 0.0 <= res["AP50"] <= 1.0 or math.isnan(res["AP50"])
    assert task.dummy_inputs(cfg, 2)[0].shape == (2, 3, 96, 96)


def test_adapter_errors(cfg_path):
    task = get_task("detection")
    cfg = load_config(cfg_path, ["model.num_classes=3"])
    with pytest.raises(ValueError, match="num_classes must be 5"):
        task.build_datasets(cfg, splits=("val",))
    with pytest.raises(ValueError, match="unknown detector option"):
        task.build_model(load_config(cfg_path, ["model.head.bogus=1"]))
    with pytest.raises(RuntimeError, match="build_model"):
        get_task("detection").batch_images(([torch.rand(3, 32, 32)], [{}]))


def test_trainer_and_tools(cfg_path, tmp_path):
    cfg = load_config(cfg_path)
    out = Trainer(cfg, get_task("detection")).train()
    assert "AP50" in out["final"]
    work = Path(cfg.runtime.work_dir)
    assert (work / "latest.pth").is_file()
    # a weights-only checkpoint of a fresh model (infer loads any checkpoint written by tools/train.py the same way)
    model = get_task("detection").build_model(cfg)
    ckpt = tmp_path / "w.pth"
    torch.save({"model": model.state_dict(), "epoch": 2}, ckpt)
    images = Path(cfg.data.root) / "VOCdevkit" / "VOC2007" / "JPEGImages"
    rc = load_tool("infer").main([str(cfg_path), "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "inf"),
                              "--score-thr", "0.0"])
    assert rc == 0
    pngs = sorted((tmp_path / "inf").glob("*.png"))
    assert len(pngs) == 6
    preds = json.loads((tmp_path / "inf" / "predictions.json").read_text())
    first = next(iter(preds.values()))
    assert set(first) >= {"boxes", "labels", "scores", "names", "output"}
    assert load_tool("browse_dataset").main([str(cfg_path), "--out", str(tmp_path / "br"), "--num", "3"]) == 0
    assert len(list((tmp_path / "br").glob("train_*.png"))) == 3
    assert load_tool("infer").main([str(cfg_path), "--checkpoint", str(ckpt), str(tmp_path / "missing.jpg"),
                                "--out", str(tmp_path / "x")]) == 1
