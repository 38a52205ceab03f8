"""tools/export.py end to end on a digits checkpoint trained here (a few iterations): ONNX with a dynamic batch,
torch.export of the backbone, the refusal to overwrite, the bad-key error lines; context execution (the segmentation
and Camelyon configs) exported and checked against eager on inputs that route differently, and its one refusal."""
from __future__ import annotations

import json
import re
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


# -- context execution (every segmentation and Camelyon config): exported in its static whole-map form ---------------
SEG = "configs/demo_seg_pce.py"
CAMELYON = "configs/demo_camelyon_seg_pce.py"


def rerouting_seed(config: str, size) -> int:
    """A torch seed under which the ``--random-weights`` model of ``config`` (built as tools/export.py builds it)
    routes the tool's two held-back inputs differently in some PCE layer: an untrained router routes mostly by
    position, so not every initialisation does."""
    from pce.tasks.export_check import routing_changes

    cfg = load_config(config)
    task = get_task(cfg.task)
    for seed in range(20):
        torch.manual_seed(seed)
        model = task.build_model(cfg).eval()
        module, make_input, _ = task.export_target(model, cfg, "model", size)
        if routing_changes(module, [make_input(2, 1), make_input(2, 2)])[0]:
            return seed
    raise AssertionError(f"no seed in 0..19 routes the held-back inputs of {config} differently")


def check_context_export(printed: str, meta_path: Path, fmt: str) -> None:
    """The tool's report: outputs equal eager, on held-back inputs that route differently in some layer."""
    changed = re.search(r"top-1 routing differs between two of them in (\d+) of (\d+) PCE layers", printed)
    assert changed and int(changed.group(1)) > 0 and int(changed.group(2)) == 2, printed
    assert f"logits: max |{fmt} - eager|" in printed
    meta = json.loads(meta_path.read_text())
    assert meta["max_abs_diff"]["logits"] < 1e-4 * max(1.0, meta["max_abs_eager"]["logits"])


@pytest.fixture(scope="module")
def camelyon_checkpoint(tmp_path_factory) -> Path:
    """``latest.pth`` of configs/demo_camelyon_seg_pce.py after 2 x 2 iterations on small generated slides, 64 px
    tiles, no evaluation: the shared phase, then upcycling, K-Means keys and learned routing (the phase it is
    saved in)."""
    from pce.datasets.camelyon import make_demo_camelyon

    tmp = tmp_path_factory.mktemp("camelyon_export")
    root = make_demo_camelyon(tmp / "demo", num_tumour=2, num_normal=2, num_test_tumour=1, num_test_normal=0,
                              size=(512, 512), seed=5)
    opts = [("runtime.work_dir", str(tmp / "wd")), ("data.root", str(root)), ("data.batch_size", 4),
            ("data.val.name", ""), ("data.test.name", ""),  # training only: the checkpoint is what matters
            ("schedule.epochs", 2), ("schedule.iters_per_epoch", 2), ("runtime.kmeans_init_batches", 1),
            ("runtime.tensorboard", False), ("runtime.progress_bar", False), ("runtime.eval_interval", 100),
            ("model.input_shape", [3, 64, 64]), ("data.train.kwargs.epoch_size", 8),
            ("phases", [dict(name="shared", epochs=1, router_override="shared", keys_trainable=False),
                        dict(name="route", epochs=-1, upcycle=True)])]
    opts += [(f"data.train.kwargs.{k}", v) for k, v in
             dict(level=1, tile_size=64, stride=64, generate=False, cache_dir=str(tmp / "cache")).items()]
    cfg = load_config(str(REPO / CAMELYON), opts)
    task = get_task(cfg.task)
    Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()
    torch.set_num_threads(1)
    return tmp / "wd" / "latest.pth"


def test_camelyon_context_onnx_random_weights(tool, tmp_path: Path, capsys):
    torch.set_num_threads(1)
    torch.manual_seed(rerouting_seed(CAMELYON, (96, 96)))
    out = tmp_path / "camelyon.onnx"
    assert tool.main([CAMELYON, "--random-weights", "--format", "onnx", "--input-size", "96", "96",
                      "--out", str(out)]) == 0
    check_context_export(capsys.readouterr().out, tmp_path / "camelyon.onnx.json", "onnx")


def test_camelyon_context_onnx_checkpoint(tool, camelyon_checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "camelyon_trained.onnx"
    assert tool.main([CAMELYON, "--checkpoint", str(camelyon_checkpoint), "--format", "onnx", "--input-size", "96",
                      "96", "--out", str(out)]) == 0
    check_context_export(capsys.readouterr().out, tmp_path / "camelyon_trained.onnx.json", "onnx")
    assert json.loads((tmp_path / "camelyon_trained.onnx.json").read_text())["weights"] == "checkpoint"


def test_seg_demo_context_torch_export(tool, tmp_path: Path, capsys):
    torch.set_num_threads(1)
    torch.manual_seed(rerouting_seed(SEG, (96, 96)))
    out = tmp_path / "seg.pt2"
    assert tool.main([SEG, "--random-weights", "--format", "torch_export", "--input-size", "96", "96",
                      "--out", str(out)]) == 0
    check_context_export(capsys.readouterr().out, tmp_path / "seg.pt2.json", "torch_export")


def test_context_with_two_experts_per_patch_error_line(tool, tmp_path: Path, capsys):
    """Context execution needs at most one expert per patch: top_k=2 is refused (eagerly too), with the key."""
    rc = tool.main([SEG, "--random-weights", "--format", "onnx", "--out", str(tmp_path / "seg.onnx"),
                    "--cfg-options", "model.backbone_overrides.top_k=2"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: model.backbone_overrides.execution: execution='context'")
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
