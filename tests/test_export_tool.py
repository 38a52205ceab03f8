"""tools/export.py end to end on a digits checkpoint trained here (a few iterations): ONNX with a dynamic batch,
torch.export of the backbone, the refusal to overwrite, the context-execution and bad-key error lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _faults_util import load_tool
from pce.engine import Trainer, load_config
from pce.tasks import get_task
from pce.tasks.hooks import default_hooks

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo_cls_digits.py")


@pytest.fixture(scope="module")
def tool():
    return load_tool("export")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """``latest.pth`` of 2 epochs x 2 iterations (saved in the learned-routing phase)."""
    wd = tmp_path_factory.mktemp("digits_export")
    cfg = load_config(DEMO, [("runtime.work_dir", str(wd)), ("schedule.epochs", 2), ("schedule.iters_per_epoch", 2),
                             ("phases.0.epochs", 1), ("phases.1.epochs", 1), ("runtime.kmeans_init_batches", 1),
                             ("runtime.tensorboard", False), ("runtime.progress_bar", False)])
    task = get_task("classification")
    Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()  # as tools/train.py
    torch.set_num_threads(1)
    return wd / "latest.pth"


def test_onnx_dynamic_batch(tool, checkpoint: Path, tmp_path: Path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "digits.onnx"
    assert tool.main([DEMO, "--checkpoint", str(checkpoint), "--format", "onnx", "--dynamic-batch",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch sizes 2, 2, 1, 5" in printed and "logits: max |onnx - eager|" in printed
    meta = json.loads((tmp_path / "digits.onnx.json").read_text())
    assert meta["output_names"] == ["logits"] and meta["dynamic_batch"] and meta["mean"] == [0.305]
    assert meta["max_abs_diff"]["logits"] < 1e-4 and meta["weights"] == "checkpoint"
    # the file runs on its own at another batch size, on what the config's transform makes of an image
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = ((torch.rand(3, 1, 16, 16) - 0.305) / 0.319).numpy()
    assert sess.run(None, {"images": x})[0].shape == (3, 10)
    assert not list(tmp_path.glob(".*partial*"))  # the temporary file was moved into place

    # never overwritten without --force: refused before anything is built
    before = out.read_bytes()
    assert tool.main([DEMO, "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: exists (") and "--force" in err
    assert out.read_bytes() == before


def test_torch_export_backbone_next_to_checkpoint(tool, checkpoint: Path, capsys):
    assert tool.main([DEMO, "--checkpoint", str(checkpoint), "--format", "torch_export", "--what", "backbone"]) == 0
    out = checkpoint.with_name("latest_backbone.pt2")
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["output_names"] == ["stage1", "stage2", "stage3"] and "backbone" in meta["exported"]
    assert max(meta["max_abs_diff"].values()) < 1e-4
    ep = torch.export.load(str(out)).module()
    maps = ep(torch.randn(2, 1, 16, 16))
    assert [m.shape[1] for m in maps.values()] == [24, 48, 64]
    assert "top-1 routing differs" in capsys.readouterr().out


def test_context_execution_error_line(tool, tmp_path: Path, capsys):
    rc = tool.main(["configs/demo_seg_pce.py", "--random-weights", "--format", "onnx", "--out",
                    str(tmp_path / "seg.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: model.backbone_overrides.execution: execution='context'")
    assert "cannot be exported" in err and "capacity" in err
    assert not list(tmp_path.iterdir())


def test_bad_config_key_and_missing_checkpoint(tool, tmp_path: Path, capsys):
    assert tool.main([DEMO, "--random-weights", "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                      "--cfg-options", "model.num_classess=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.num_classess" in err and err.count("\n") == 1
    assert tool.main([DEMO, "--checkpoint", str(tmp_path / "none.pth"), "--format", "onnx"]) == 1
    assert "none.pth" in capsys.readouterr().err
    assert tool.main([DEMO, "--random-weights", "--format", "onnx"]) == 1  # no file next to a checkpoint
    assert capsys.readouterr().err.startswith("error: --out: missing")
