"""Issue #23, the image tools and the shared handler: clashing file stems, outputs never overwritten without
--force and written atomically, float / 16-bit / NaN / huge images, detections in the input image's own
coordinates, flag ranges, one handler for every tool, disk-full messages naming the file. Each test failed on the
code before the change (see docs/RELIABILITY.md, "Image tools (issue #23)")."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pce.engine import atomic_save, dump_config, load_config
from pce.engine.errors import PCEError, run_cli
from pce.tasks import get_task

from _faults_util import REPO, error_line, load_tool, tiny_cfg


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """``(config path, checkpoint)`` of a fresh tiny digits classifier (8x8 inputs)."""
    tmp = tmp_path_factory.mktemp("cls_run")
    cfg = tiny_cfg(tmp / "wd")
    dump_config(cfg, tmp / "cfg.py")
    torch.manual_seed(0)
    model = get_task("classification").build_model(cfg)
    atomic_save({"model": model.state_dict(), "epoch": 1}, tmp / "w.pth")
    return tmp / "cfg.py", tmp / "w.pth"


def _png(path: Path, value, size=(20, 24), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=dtype)).save(path)
    return path


def _infer(*argv) -> int:
    return load_tool("infer").main([str(a) for a in argv])


def _tool(name: str, *argv) -> int:
    """A tool whose ``main`` takes parsed arguments (visualize_routing, analyze_routing), as ``__main__`` runs it."""
    tool = load_tool(name)
    args = tool.parse_args([str(a) for a in argv])
    return run_cli(lambda: tool.main(args), debug=args.debug)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------ 1. clashing stems
def test_clashing_stems_get_distinct_outputs(cls_run, tmp_path, capsys):
    """1. a/x.png, b/x.png and c/x_1.png: three pictures with distinct, deterministic names (x, x_2, x_1 in input
    order: x_1 is another input's own stem), each recorded with its input path; the same in visualize_routing."""
    cfg, ckpt = cls_run
    inputs = [_png(tmp_path / "a" / "x.png", 10), _png(tmp_path / "b" / "x.png", 200),
              _png(tmp_path / "c" / "x_1.png", 90)]
    assert _infer(cfg, "--checkpoint", ckpt, *inputs, inputs[0], "--out", tmp_path / "inf") == 0  # a repeat: once
    preds = json.loads((tmp_path / "inf/predictions.json").read_text())
    outputs = {k: Path(v["output"]).name for k, v in preds.items()}
    assert outputs == {str(inputs[0]): "x.png", str(inputs[1]): "x_2.png", str(inputs[2]): "x_1.png"}
    assert sorted(p.name for p in (tmp_path / "inf").glob("*.png")) == ["x.png", "x_1.png", "x_2.png"]
    capsys.readouterr()

    assert _tool("visualize_routing", cfg, "--checkpoint", ckpt, "--images", *inputs, "--out", tmp_path / "vis") == 0
    assert "3 routing maps written" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == ["x.png", "x_1.png", "x_2.png"]
    maps = json.loads((tmp_path / "vis/routing_maps.json").read_text())
    assert {k: Path(v).name for k, v in maps.items()} == outputs


# ----------------------------------------------------------------------- 2. --force, atomic writes
def test_outputs_are_never_overwritten_without_force(cls_run, tmp_path, capsys):
    """2. A second run into the same folder is refused (one line naming an existing output, exit 1) and leaves
    every file as it was; --force replaces them. infer, visualize_routing, analyze_routing, browse_dataset."""
    cfg, ckpt = cls_run
    img = _png(tmp_path / "in" / "a.png", 50)
    runs = {
        "infer": lambda out, *f: _infer(cfg, "--checkpoint", ckpt, img, "--out", out, *f),
        "visualize_routing": lambda out, *f: _tool("visualize_routing", cfg, "--checkpoint", ckpt, "--images", img,
                                                   "--out", out, *f),
        "analyze_routing": lambda out, *f: _tool("analyze_routing", cfg, "--checkpoint", ckpt, "--num", 16,
                                                 "--clusters", 2, "--out", out, *f),
        "browse_dataset": lambda out, *f: load_tool("browse_dataset").main([str(cfg), "--split", "val", "--num", "2",
                                                                            "--out", str(out), *f]),
    }
    for name, run in runs.items():
        out = tmp_path / name
        assert run(out) == 0, name
        before = _files(out)
        assert before, name
        capsys.readouterr()
        assert run(out) == 1, name
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {out}") and "already exists" in line and "--force" in line, (name, line)
        assert _files(out) == before, name                       # nothing touched
        assert run(out, "--force") == 0, name
        capsys.readouterr()
        assert not [p for p in out.iterdir() if p.name.startswith(".")], name  # no temp file left


def test_save_png_is_atomic_and_fails_loudly(tmp_path, monkeypatch):
    """2. A PNG write that fails half-way (disk full) raises an error naming the file, keeps the previous file
    and leaves no temp file."""
    from pce.tasks.visualize import save_png

    dst = save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "p.png")
    old = dst.read_bytes()

    def full_disk(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(PCEError) as e:
        save_png(torch.ones(3, 8, 8), dst)
    assert str(e.value).startswith(f"{dst}: ") and "No space left" in str(e.value)
    assert dst.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["p.png"]


# ----------------------------------------------------------------------------------- 3. pixel values, sizes
def _tiff(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("F", "I")
    return path


def test_float_and_wide_images_are_refused_not_clipped(tmp_path):
    """3. A float TIFF with values above 1 (here 300) or a NaN pixel, and a 32-bit image above 65535, are errors
    naming the file and the values (tools and the VOC reader); a float image in [0, 1] reads as it is."""
    from pce.datasets.voc_images import _load_rgb
    from pce.tasks.tooling import load_image

    ok = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    img = load_image(_tiff(tmp_path / "ok.tiff", ok), 1)
    assert torch.allclose(img[0], torch.from_numpy(ok))

    big = _tiff(tmp_path / "big.tiff", np.full((12, 10), 300.0, np.float32))
    with pytest.raises(PCEError, match=rf"^{big}: .*300.*outside \[0, 1\]"):
        load_image(big, 3)
    with pytest.raises(ValueError, match=rf"{big}: .*300"):
        _load_rgb(big)
    nan = np.full((12, 10), 0.5, np.float32)
    nan[3, 4] = np.nan
    nan = _tiff(tmp_path / "nan.tiff", nan)
    with pytest.raises(PCEError, match=rf"^{nan}: 1 NaN"):
        load_image(nan, 3)
    with pytest.raises(ValueError, match=rf"{nan}: 1 NaN"):
        _load_rgb(nan)
    wide = _tiff(tmp_path / "wide.tiff", np.full((12, 10), 70000, np.int32))
    with pytest.raises(PCEError, match=rf"^{wide}: .*70000"):
        load_image(wide, 3)


def test_visualize_routing_reads_16bit_and_checks_sizes(cls_run, tmp_path, capsys, monkeypatch):
    """3. visualize_routing: a 16-bit PNG reaches the model scaled by 65535 (not white); data.max_input_size
    applies; a decompression bomb is a one-line error naming the file (not an internal error)."""
    from pce.tasks.tooling import display, file_samples

    cfg_path, ckpt = cls_run
    cfg = load_config(cfg_path)
    png16 = _png(tmp_path / "deep.png", 30000, (12, 10), np.uint16)
    samples, names, transform = file_samples(cfg, get_task("classification"), [png16])
    assert names == ["deep"]
    assert torch.allclose(display(samples[0][0], transform), torch.full((1, 8, 8), 30000 / 65535), atol=1e-3)

    big = _png(tmp_path / "big.png", 10, (40, 30))
    assert _tool("visualize_routing", cfg_path, "--checkpoint", ckpt, "--images", big, "--out", tmp_path / "v1",
                 "--cfg-options", "data.max_input_size=32") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {big}: 30x40 pixels is larger than data.max_input_size=32")

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert _tool("visualize_routing", cfg_path, "--checkpoint", ckpt, "--images", big, "--out", tmp_path / "v2") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {big}: ") and "decompression" in line and "MAX_IMAGE_PIXELS" in line
    from pce.datasets.voc_images import _load_rgb

    with pytest.raises(ValueError, match=rf"^{big}: too many pixels.*decompression"):  # the VOC reader too
        _load_rgb(big)


def test_visualize_routing_refuses_images_below_the_minimum_side(tmp_path, capsys):
    """3. A 1x1 image for segmentation: one line naming the file and the minimum side (was a GroupNorm error)."""
    seg_cfg = REPO / "configs/demo_seg_pce.py"
    torch.manual_seed(0)
    model = get_task("segmentation").build_model(load_config(seg_cfg))
    atomic_save({"model": model.state_dict(), "epoch": 1}, tmp_path / "seg.pth")
    tiny = _png(tmp_path / "tiny.png", 0, (1, 1, 3))
    assert _tool("visualize_routing", seg_cfg, "--checkpoint", tmp_path / "seg.pth", "--images", tiny,
                 "--out", tmp_path / "v") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {tiny}: 1x1 pixels is smaller than the model's minimum side 32")


# ------------------------------------------------------------------------- 4. the input image's own frame
def test_infer_detections_in_the_input_images_frame(tmp_path):
    """4. A 640x427 photo: the boxes in predictions.json are the model's boxes (in the 128x85 frame it saw)
    scaled back by 640/128 and 427/85, the picture is 640x427, and image_size / model_input_size are recorded."""
    from pce.tasks.tooling import eval_transform

    cfg_path = REPO / "configs/demo_det_pce.py"
    cfg = load_config(cfg_path)
    task = get_task("detection")
    torch.manual_seed(0)
    # saved at the last epoch: the learned routing of the last phase (the first phase's random routing would
    # make two forwards differ)
    atomic_save({"model": task.build_model(cfg).state_dict(), "epoch": int(cfg.schedule.epochs)},
                tmp_path / "det.pth")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (427, 640, 3), dtype=np.uint8)).save(photo)

    assert _infer(cfg_path, "--checkpoint", tmp_path / "det.pth", photo, "--out", tmp_path / "out",
                  "--score-thr", "0") == 0
    rec = json.loads((tmp_path / "out/predictions.json").read_text())[str(photo)]
    assert rec["image_size"] == [427, 640] and rec["model_input_size"] == [85, 128]
    assert Image.open(rec["output"]).size == (640, 427)

    # independently: the model's own boxes in the frame it saw, scaled by hand
    from pce.engine.evaluation import load_trained_weights

    model = task.build_model(cfg)
    load_trained_weights(model, cfg, str(tmp_path / "det.pth"))
    model.eval()
    image = torch.from_numpy(np.asarray(Image.open(photo), dtype=np.float32) / 255).permute(2, 0, 1)
    x, _ = eval_transform(cfg)(image, task.empty_target(image))
    assert tuple(x.shape[-2:]) == (85, 128)
    with torch.no_grad():
        boxes = model([x])[0]["boxes"]
    assert len(boxes) > 0
    want = boxes * torch.tensor([640 / 128, 427 / 85, 640 / 128, 427 / 85])
    got = torch.tensor(rec["boxes"])
    assert got.shape == want.shape and torch.allclose(got, want, atol=0.01)
    assert float(got[:, 2].max()) > 128 or float(got[:, 3].max()) > 85  # not the model frame

    # a transform that pads to size_divisibility: the model input is the resized image without the padding, so
    # the scale back is still 640 / 128 and 427 / 85
    from pce.datasets import build_transform

    padding = build_transform("voc_detection", train=False, min_size=128, max_size=128, size_divisibility=32)
    padded, _ = padding(image, task.empty_target(image))
    x2, _ = task.prepare_image(cfg, image, padding)
    assert tuple(padded.shape[-2:]) == (96, 128) and torch.equal(x2, padded[:, :85, :128])


# ------------------------------------------------------------------------------------- 5. flag ranges
@pytest.mark.parametrize("flag,value", [("--score-thr", "nan"), ("--score-thr", "1.5"), ("--score-thr", "-0.1"),
                                        ("--alpha", "1.2"), ("--alpha", "nan")])
def test_out_of_range_flags_are_one_line_errors(cls_run, tmp_path, capsys, flag, value):
    """5. --score-thr nan / outside [0, 1] and --alpha outside [0, 1]: one line naming the flag, nothing written."""
    cfg, ckpt = cls_run
    img = _png(tmp_path / "a.png", 50)
    assert _infer(cfg, "--checkpoint", ckpt, img, "--out", tmp_path / "out", flag, value) == 1
    assert error_line(capsys.readouterr().err).startswith(f"error: {flag}: {value} ")
    assert not (tmp_path / "out").exists()
    if flag == "--alpha":
        assert load_tool("browse_dataset").main([str(cfg), "--out", str(tmp_path / "br"), flag, value]) == 1
        assert error_line(capsys.readouterr().err).startswith(f"error: {flag}: {value} ")


# ------------------------------------------------------------------------- 6. one handler, disk full
def test_every_tool_has_the_one_handler_and_debug(tmp_path, capsys):
    """6. browse_dataset, print_config, make_demo_data, summarize_runs, analyze_model, publish_model: a bad input
    is one line naming it with exit status 1; --debug shows the traceback."""
    missing = tmp_path / "missing.py"
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"type": "val", "epoch": 1, "top1": 0.5}\n{not json\n')
    cases = {
        "browse_dataset": ([str(missing), "--out", str(tmp_path / "o")], str(missing)),
        "print_config": ([str(missing)], str(missing)),
        "analyze_model": ([str(missing)], str(missing)),
        "summarize_runs": ([str(tmp_path / "run")], f"{tmp_path / 'run/metrics.jsonl'}: line 2"),
        "make_demo_data": (["--root", str(tmp_path / "afile"), "--num-train", "1", "--num-val", "1"],
                           str(tmp_path / "afile")),
        "publish_model": ([str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")], str(tmp_path / "missing.pth")),
    }
    for name, (argv, culprit) in cases.items():
        tool = load_tool(name)
        assert tool.main(argv) == 1, name
        line = error_line(capsys.readouterr().err)
        assert culprit in line, (name, line)
        assert tool.main(argv + ["--debug"]) == 1, name
        assert "Traceback" in capsys.readouterr().err, name


def test_disk_full_names_the_file(cls_run, tmp_path, capsys, monkeypatch):
    """6. A write that fails with ENOSPC: one line naming the file being written (PNG, JSON, matplotlib figure),
    exit status 1, and no half-written file."""
    import matplotlib.figure

    cfg, ckpt = cls_run
    img = _png(tmp_path / "in" / "a.png", 50)

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", enospc)
        assert _infer(cfg, "--checkpoint", ckpt, img, "--out", tmp_path / "o1") == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path / 'o1' / 'a.png'}: ") and "No space left" in line
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", enospc)
        assert _infer(cfg, "--checkpoint", ckpt, img, "--out", tmp_path / "o2") == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path / 'o2'}/") and ".json: " in line and "No space left" in line
    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", enospc)
        assert _tool("visualize_routing", cfg, "--checkpoint", ckpt, "--images", img, "--out", tmp_path / "o3") == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path / 'o3' / 'a.png'}: ") and "No space left" in line
        assert _tool("analyze_routing", cfg, "--checkpoint", ckpt, "--num", 16, "--clusters", 2,
                     "--out", tmp_path / "o4") == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {tmp_path / 'o4'}/") and ".png: " in line and "No space left" in line
    for out in ("o1", "o2", "o3", "o4"):
        folder = tmp_path / out
        assert not folder.exists() or not [p for p in folder.iterdir() if p.name.startswith(".")], out
