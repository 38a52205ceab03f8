"""A first run that respects the user's time (issue #24): the demo's last screen names every output that exists
and the next commands as typed here, the quick and --full recipes, and every evaluation tool applies
``runtime.num_threads`` (tools/eval.py, tools/infer.py, tools/infer_slide.py)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pce.engine import atomic_save, load_config
from pce.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "configs/demo_cls_digits.py"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"first_run_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_work_dir(work: Path) -> None:
    """What the demo's five steps leave in a work dir (contents stand-ins; names and formats real)."""
    work.mkdir(parents=True)
    cfg = {"model": {"backbone": "pce_tiny"}, "schedule": {"epochs": 4, "iters_per_epoch": 50},
           "data": {"root": "data/demo_voc", "batch_size": 8}}
    (work / "config.json").write_text(json.dumps(cfg))
    (work / "metrics_val.json").write_text(json.dumps({"mAP": 0.25, "AP50": 0.5312, "AP50_voc07": 0.52,
                                                       "num_images": 100}))
    (work / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"type": "train", "epoch": 1, "loss": 1.0}, {"type": "val", "epoch": 1, "AP50": 0.114},
        {"type": "val", "epoch": 2, "AP50": 0.5312}, {"type": "test", "AP50": 0.5312}]))
    for d, index in (("predictions", "predictions.json"), ("routing_maps", "routing_maps.json")):
        (work / d).mkdir()
        for i in range(3):
            (work / d / f"00040{i}.png").write_bytes(b"png")
        (work / d / index).write_text("{}")
    for name in ("best.pth", "report.html", "train.log"):
        (work / name).write_text("x")


def test_summary_names_every_output_and_the_next_commands(tmp_path, monkeypatch):
    demo = _tool("demo")
    monkeypatch.chdir(tmp_path)
    work = Path("work_dirs/demo")
    _fake_work_dir(tmp_path / work)
    text = demo.summary(work, wall_s=90.0, cpu_s=150.0)
    lines = text.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 160  # one screen
    assert lines[0].startswith("PCE demo done in 1.5 min (2.5 CPU-min)")
    assert "4 epochs x 50 steps of 8 images" in lines[0]
    assert "val AP50 0.531" in lines[1] and "after the first epoch it was 0.114" in lines[1]
    outputs = lines[lines.index("outputs:") + 1:next(i for i, l in enumerate(lines) if l.startswith("next"))]
    listed = [l[22:].split()[0] for l in outputs]  # "  <what, 20 wide><path>[  (contents)]"
    assert sorted(listed) == sorted(f"work_dirs/demo/{n}" for n in (
        "best.pth", "config.json", "metrics_val.json", "predictions/", "routing_maps/", "report.html", "train.log",
        "metrics.jsonl"))
    for p in listed:  # real paths, relative to where the user stands
        assert not os.path.isabs(p) and p.startswith("work_dirs/demo/") and (tmp_path / p).exists(), p
    assert "(3 PNGs + predictions.json)" in text and "(3 PNGs + routing_maps.json)" in text
    py = os.path.relpath(sys.executable, tmp_path) if sys.executable.startswith(str(tmp_path)) else sys.executable
    assert f"{py} tools/eval.py work_dirs/demo/config.json --checkpoint work_dirs/demo/best.pth" in text
    assert f"{py} tools/demo.py --full" in text


def test_python_command_is_relative_under_the_current_folder(tmp_path, monkeypatch):
    demo = _tool("demo")
    venv = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(venv))
    monkeypatch.chdir(tmp_path)
    assert demo.python_command() == ".venv/bin/python"
    monkeypatch.chdir(ROOT)
    assert demo.python_command() == str(venv)


def test_quick_and_full_recipes():
    demo = _tool("demo")
    assert demo.training_overrides(demo.parse_args([])) == []  # the quick config as written
    quick = load_config(ROOT / demo.QUICK)
    assert (quick.schedule.epochs, quick.schedule.iters_per_epoch) == (4, 50)
    assert [p["epochs"] for p in quick.phases] == [1, 1, -1]
    # --full: the recipe the demo ran before (configs/demo_det_pce.py, 6 epochs, 1 routing epoch, full passes)
    assert demo.training_overrides(demo.parse_args(["--full"])) == ["schedule.epochs=6", "phases.1.epochs=1"]
    assert demo.training_overrides(demo.parse_args(["--epochs", "9", "--iters-per-epoch", "2",
                                                    "--cfg-options", "runtime.num_threads=1"])) == [
        "schedule.epochs=9", "phases.1.epochs=2", "schedule.iters_per_epoch=2", "runtime.num_threads=1"]
    with pytest.raises(SystemExit):
        demo.parse_args(["--epochs", "2"])


@pytest.fixture
def digits_ckpt(tmp_path):
    cfg = load_config(ROOT / DIGITS)
    ckpt = tmp_path / "digits.pth"
    atomic_save({"model": get_task(cfg.task).build_model(cfg).state_dict(), "epoch": 1}, ckpt)
    return ckpt


def _record_threads(monkeypatch, module, name):
    """Wrap ``module.name`` to record torch's thread count when it is called (mid-run)."""
    seen = []
    original = getattr(module, name)

    def wrapper(*a, **k):
        seen.append(torch.get_num_threads())
        return original(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def test_eval_applies_num_threads(digits_ckpt, tmp_path, monkeypatch):
    tool = _tool("eval")
    seen = _record_threads(monkeypatch, tool, "evaluate_checkpoint")
    torch.set_num_threads(2)
    rc = tool.main([DIGITS, "--checkpoint", str(digits_ckpt), "--split", "val", "--out", str(tmp_path / "m.json"),
                    "--cfg-options", "runtime.num_threads=1"])
    assert rc == 0 and seen == [1]
    assert "top1" in json.loads((tmp_path / "m.json").read_text())


def test_infer_applies_num_threads(digits_ckpt, tmp_path, monkeypatch):
    import pce.engine.evaluation as evaluation
    from PIL import Image

    tool = _tool("infer")
    seen = _record_threads(monkeypatch, evaluation, "load_trained_model")
    Image.new("L", (16, 16), 128).save(tmp_path / "x.png")
    torch.set_num_threads(2)
    rc = tool.main([DIGITS, "--checkpoint", str(digits_ckpt), str(tmp_path / "x.png"), "--out",
                    str(tmp_path / "out"), "--cfg-options", "runtime.num_threads=1"])
    assert rc == 0 and seen == [1] and (tmp_path / "out" / "x.png").is_file()


def test_infer_slide_applies_num_threads(digits_ckpt, tmp_path, monkeypatch, capsys):
    from pce.datasets.camelyon import make_demo_camelyon
    from pce.engine.errors import PCEError

    root = make_demo_camelyon(tmp_path / "slides", num_tumour=1, num_normal=0, num_test_tumour=1, num_test_normal=0,
                              size=(512, 384), seed=1)
    tool = _tool("infer_slide")
    seen = []

    def load_model(*a, **k):  # the model is where the threads must already be set; the run stops here
        seen.append(torch.get_num_threads())
        raise PCEError("load_model", "stopped by the test", "nothing")

    monkeypatch.setattr(tool, "load_model", load_model)
    torch.set_num_threads(2)
    slide = sorted((root / "testing" / "images").glob("*.tif"))[0]
    rc = tool.main(["configs/demo_camelyon_seg_pce.py", "--checkpoint", str(digits_ckpt), str(slide), "--out",
                    str(tmp_path / "heat"), "--cfg-options", f"data.root={root}", "runtime.num_threads=1"])
    assert rc == 1 and "stopped by the test" in capsys.readouterr().err and seen == [1]
