"""configs/voc_*.py: without VOC data tools/train.py fails fast with setup instructions; on a tiny generated
demo set (VOC format) the detection config trains end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

from pce.datasets import DEMO_CLASSES, make_demo_voc
from pce.engine import load_config
from _faults_util import load_tool

REPO = Path(__file__).resolve().parents[1]
VOC_CONFIGS = ["voc_det_pce.py", "voc_det_dense.py", "voc_seg_pce.py", "voc_seg_dense.py"]


@pytest.mark.parametrize("name", VOC_CONFIGS)
def test_voc_configs_follow_the_protocol(name: str):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.num_classes == 21 and cfg.data.root == "data"
    if cfg.task == "detection":   # VOC07+12 trainval -> VOC07 test
        assert list(cfg.data.train.kwargs.year) == ["2007", "2012"] and cfg.data.train.kwargs.image_set == "trainval"
        assert cfg.data.val.kwargs.year == "2007" and cfg.data.val.kwargs.image_set == "test"
    else:                         # VOC2012 train -> val
        assert cfg.task == "segmentation" and cfg.model.head.arch == "FPN"
        assert cfg.data.train.kwargs.year == "2012" and cfg.data.train.kwargs.image_set == "train"
        assert cfg.data.val.kwargs.year == "2012" and cfg.data.val.kwargs.image_set == "val"
    dense = name.endswith("_dense.py")
    assert cfg.model.backbone.startswith("dense_" if dense else "pce_")
    assert (len(cfg.phases) == 1) == dense


@pytest.mark.parametrize("name", ["voc_det_pce.py", "voc_seg_pce.py"])
def test_train_without_voc_data_explains_the_setup(tmp_path: Path, capsys, name: str):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = load_tool("train").main([f"configs/{name}", "--work-dir", str(tmp_path / "wd"),
                                  "--cfg-options", f"data.root={str(empty)!r}", "runtime.device='cpu'"])
    assert rc == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "How to obtain it" in err
    assert "VOCdevkit" in err and "data.root" in err and "host.robots.ox.ac.uk" in err   # where to put the data
    assert "data.root=data/demo_voc model.num_classes=5 data.train.kwargs.demo=True" in err   # the demo route
    assert not (tmp_path / "wd").exists()  # failed before writing anything


@pytest.mark.slow
def test_voc_det_trains_on_a_tiny_demo_set(tmp_path: Path, capsys):
    root = make_demo_voc(tmp_path / "voc", num_train=4, num_val=2, image_size=96)
    classes = list(DEMO_CLASSES)
    wd = tmp_path / "wd"
    size = ["min_size=96", "max_size=96"]
    opts = [f"data.root={str(root)!r}", "model.num_classes=5",
            "data.train.kwargs.year='2007'", "data.train.kwargs.image_set='train'",
            f"data.train.kwargs.classes={classes!r}", f"data.val.kwargs.classes={classes!r}",
            *[f"data.{s}.transform.kwargs.{kv}" for s in ("train", "val") for kv in size],
            *[f"model.head.{kv}" for kv in size], "model.head.fpn_channels=32", "model.head.representation_size=64",
            "schedule.epochs=1", "schedule.max_iters=2", "phases=[{'name': 'route', 'epochs': -1}]",
            "runtime.kmeans_init_batches=1", "runtime.device='cpu'", "runtime.num_threads=1",
            "runtime.tensorboard=False", "runtime.progress_bar=False",
            "data.batch_size=2", "data.num_workers=0"]
    rc = load_tool("train").main(["configs/voc_det_pce.py", "--work-dir", str(wd), "--cfg-options", *opts])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "final val AP50_voc07:" in out.out and "(2 images)" in out.out   # no data.test: val is the final split
    assert {"latest.pth", "config.py", "metrics.jsonl"} <= {p.name for p in wd.iterdir()}
    saved = load_config(wd / "config.py")
    assert saved.model.backbone == "pce_small" and saved.model.num_classes == 5
