"""tools/train.py + tools/eval.py end to end on the digits demo, print_config, analyze_model, missing data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pce.engine import load_config
from pce.tasks import get_task
from _faults_util import load_tool

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo_cls_digits.py"


def run_tool(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_then_eval_cli(tmp_path: Path):
    wd = tmp_path / "wd"
    r = run_tool("tools/train.py", DEMO, "--work-dir", str(wd), "--seed", "1", "--cfg-options", "schedule.epochs=2",
                 "schedule.iters_per_epoch=4", "phases.0.epochs=1", "phases.1.epochs=1",
                 "runtime.kmeans_init_batches=2",
                 "runtime.tensorboard=False", "runtime.progress_bar=False")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = [line for line in r.stdout.splitlines() if line.startswith("final test top1:")]
    assert last and last[0].endswith("(450 images)"), r.stdout[-2000:]
    assert "K-Means initialised" in r.stdout and "phase 2/3 'route'" in r.stdout
    assert {"latest.pth", "best.pth", "config.py", "metrics.jsonl"} <= {p.name for p in wd.iterdir()}
    assert load_config(wd / "config.py").runtime.seed == 1

    out = tmp_path / "metrics.json"
    r = run_tool("tools/eval.py", DEMO, "--checkpoint", str(wd / "latest.pth"), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads(out.read_text())
    assert 0.0 <= m["top5"] <= 1.0 and m["top1"] <= m["top5"] and m["num_samples"] == 450
    assert len(m["per_class_acc"]) == 10 and set(m["per_class_acc"]) == {str(i) for i in range(10)}
    cm = m["confusion_matrix"]
    assert len(cm) == 10 and all(len(row) == 10 for row in cm) and sum(map(sum, cm)) == 450
    assert sum(cm[i][i] for i in range(10)) == round(m["top1"] * 450)
    # the final top1 printed by train.py is the one eval.py measures on the same (last) weights
    assert f"final test top1: {m['top1']:.4f}" in last[0]


def test_eval_missing_checkpoint(tmp_path: Path, capsys):
    assert load_tool("eval").main([DEMO, "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_print_config(capsys):
    tool = load_tool("print_config")
    assert tool.main([DEMO, "--cfg-options", "optimizer.lr=0.02", "schedule.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "'lr': 0.02" in out and "'epochs': 5" in out and "task = 'classification'" in out
    assert "'backbone': 'pce_fmnist'" in out and "phases = [" in out
    assert tool.main([DEMO, "--format", "yaml"]) == 0
    assert "backbone: pce_fmnist" in capsys.readouterr().out
    assert tool.main([DEMO, "--cfg-options", "optimizer.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert "optimizer.lrr" in err and "--cfg-options" in err


def test_analyze_model(capsys):
    tool = load_tool("analyze_model")
    assert tool.main([DEMO]) == 0
    out = capsys.readouterr().out
    assert "| module" in out and "#flops" in out and "backbone.stages.0.layers.0" in out
    assert "M parameters" in out and "M FLOPs" in out
    # deformable attention (stage 3 of the Tiny ImageNet model): attention and grid sampling are counted
    assert tool.main(["configs/tinyimagenet_cls_pce.py", "--max-depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "scaled_dot_product_attention" not in out and "grid_sampler" not in out and "(1, 3, 64, 64)" in out


@pytest.mark.parametrize("config,what", [
    ("fmnist_cls_pce.py", "fashion_mnist"), ("fmnist_cls_dense.py", "fashion_mnist"), ("mnist_cls_pce.py", "mnist"),
    ("cifar10_cls_pce.py", "cifar10"), ("tinyimagenet_cls_pce.py", "tiny_imagenet")])
def test_missing_data_message(tmp_path: Path, config: str, what: str):
    missing = tmp_path / "no_such_dir"
    cfg = load_config(REPO / "configs" / config, [("data.root", str(missing))])
    with pytest.raises(FileNotFoundError) as e:
        get_task("classification").build_datasets(cfg, splits=("train",))
    msg = str(e.value)
    assert str(missing) in msg and what in msg and "How to obtain it" in msg and "data.root" in msg
