"""tools/report.py writes one self-contained page that renders in headless Chromium with all its images."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pce.engine import Trainer, load_config
from pce.tasks import get_task
from pce.tasks.hooks import default_hooks
from _faults_util import load_tool

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo_cls_digits.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("report_run")
    cfg = load_config(DEMO, [("runtime.work_dir", str(wd)), ("schedule.epochs", 2), ("schedule.iters_per_epoch", 3),
                             ("phases.0.epochs", 1), ("phases.1.epochs", 1), ("runtime.kmeans_init_batches", 2),
                             ("runtime.log_interval", 1), ("runtime.tensorboard", False),
                             ("runtime.progress_bar", False)])
    task = get_task("classification")
    Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()  # as tools/train.py: routing statistics logged
    torch.set_num_threads(1)
    tool = load_tool("report")
    assert tool.main(tool.parse_args([str(wd), "--num", "48", "--images", "2"])) == 0
    return wd / "report.html"


def test_report_is_self_contained(report: Path):
    page = report.read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    assert "top1" in page and "per_class_acc" in page and "NMI class" in page
    assert "Experts: diversity and causal tests" in page and "Causal tests" in page  # issue #26's section


def _chromium(*args: str, url: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp()
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--no-first-run",
                               f"--user-data-dir={profile}", *args, url], capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_renders_in_chromium(report: Path, tmp_path: Path):
    url = report.resolve().as_uri()
    dom = _chromium("--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom", url=url)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    n = len(re.findall(r"<img", report.read_text()))
    assert 'data-images="all"' in body.group(0) and f'data-images-loaded="{n}/{n}"' in body.group(0), body.group(0)

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,1600", "--virtual-time-budget=5000", url=url)
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert px.std() > 10  # not a blank page
    assert len(np.unique(px.reshape(-1, 3)[::97], axis=0)) > 50  # pictures, not only text on white
