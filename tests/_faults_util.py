"""Shared helpers of tests/test_faults_*.py: tiny runs on the 8x8 digits demo, demo VOC data, in-process tools."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from pce.engine import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo_cls_digits.py"
TINY_STAGES = [dict(channels=8, depth=1, patch_size=4, stride=1), dict(channels=16, depth=1, patch_size=2, stride=2)]
PHASES = [dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
          dict(name="route", epochs=-1, router_override=None, keys_trainable=False)]


def tiny_overrides(work_dir: Path, epochs: int = 2, iters: int = 2, phases=None):
    return [
        ("runtime.work_dir", str(work_dir)),
        ("model.backbone_overrides.stem_channels", 8), ("model.backbone_overrides.stages", TINY_STAGES),
        ("model.input_shape", [1, 8, 8]),
        ("data.train.kwargs.size", 8), ("data.val.kwargs.size", 8), ("data.test.name", ""),
        ("data.batch_size", 16), ("data.eval_batch_size", 256), ("data.num_workers", 0),
        ("schedule.epochs", epochs), ("schedule.iters_per_epoch", iters), ("phases", PHASES if phases is None
                                                                           else phases),
        ("runtime.kmeans_init_batches", 1), ("runtime.tensorboard", False), ("runtime.progress_bar", False),
        ("runtime.log_interval", 1), ("runtime.num_threads", 0), ("runtime.eval_interval", 1),
    ]


def tiny_cfg(work_dir: Path, *extra, epochs: int = 2, iters: int = 2, phases=None):
    return load_config(DEMO, tiny_overrides(work_dir, epochs, iters, phases) + list(extra))


def cli_options(work_dir: Path, epochs: int = 1, iters: int = 1):
    """tools/train.py arguments of the tiny run."""
    out = ["--work-dir", str(work_dir), "--cfg-options"]
    for k, v in tiny_overrides(work_dir, epochs, iters)[1:]:
        out.append(f"{k}={v!r}")
    return out


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"faults_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def error_line(err: str) -> str:
    """The one ``error:`` line a tool printed (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def demo_voc(root: Path, num_train: int = 3, num_val: int = 2) -> Path:
    from pce.datasets.demo_voc import make_demo_voc

    make_demo_voc(root, num_train=num_train, num_val=num_val, image_size=32, seed=0)
    return root / "VOCdevkit" / "VOC2007"
