"""Issue #23, the whole-slide items: ``tools/infer_slide.py`` and the Camelyon datasets lose nothing (atomic outputs,
no overwrite without ``--force``, ``--skip-existing`` to resume a folder of slides) and are never silently wrong
(annotations checked against the slide and the folder, no assumed resolution, config typos named, same-stem slides,
grayscale scans, slides without tissue, per-epoch balanced draws); every error is one line naming the file.

Each test failed on the code before the fix. Generated slides (512 x 384 px, 3 levels) and a freshly initialised
model of ``configs/demo_camelyon_seg_pce.py`` on 64 px tiles keep the whole file to a few seconds per test.
"""
from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from _faults_util import error_line, load_tool
from pce.datasets.camelyon import (Annotation, CamelyonTiles, make_synthetic_slide, read_asap_xml, tissue_mask,
                                   write_asap_xml)

CONFIG = "configs/demo_camelyon_seg_pce.py"
SIZE = (512, 384)
SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _pyramid(path: Path, image: np.ndarray, mpp=2.0, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF of ``image`` (RGB ``[H, W, 3]`` or grayscale ``[H, W]``), with or without mpp tags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {} if mpp is None else dict(resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        img = image
        for k in range(levels):
            if k:
                img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
            if mpp is not None:
                kw["resolution"] = (1e4 / mpp / 2 ** k,) * 2
            tif.write(img, photometric="rgb" if img.ndim == 3 else "minisblack", tile=(128, 128),
                      compression="zlib", subfiletype=1 if k else 0, **kw)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two slides (tumour with its XML, normal), a finite and a NaN checkpoint, the tile options."""
    from pce.engine import atomic_save, load_config
    from pce.tasks import get_task

    root = tmp_path_factory.mktemp("faults_slides")
    tum = make_synthetic_slide(root / "slides" / "slide_001.tif", root / "ann" / "slide_001.xml", size=SIZE, seed=3,
                               levels=3, tile=128)
    nor = make_synthetic_slide(root / "slides" / "slide_002.tif", None, size=SIZE, tumour=False, seed=4, levels=3,
                               tile=128)
    tiles = dict(level=1, tile_size=64, stride=64, min_tissue=0.5, cache_dir=str(root / "cache"))
    opts = ["model.input_shape=[3,64,64]"] + [f"data.test.kwargs.{k}={v}" for k, v in tiles.items()]
    cfg = load_config(CONFIG, opts)
    torch.manual_seed(0)
    model = get_task(cfg.task).build_model(cfg)
    atomic_save({"model": model.state_dict(), "epoch": 1}, root / "ok.pth")
    sd = model.state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = torch.full_like(sd[key], float("nan"))
    atomic_save({"model": sd, "epoch": 1}, root / "nan.pth")
    return {"root": root, "tumour": tum, "normal": nor, "opts": opts, "tiles": tiles, "ckpt": root / "ok.pth",
            "nan": root / "nan.pth", "ann": root / "ann"}


def infer(env, capsys, *args, ckpt=None, opts=()):
    """``(exit status, stdout, stderr)`` of tools/infer_slide.py run in this process."""
    capsys.readouterr()
    argv = [CONFIG, "--checkpoint", str(ckpt or env["ckpt"]), *map(str, args), "--png-size", "256",
            "--cfg-options", *env["opts"], *opts]
    rc = load_tool("infer_slide").main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def outputs(out: Path, stem: str):
    return [out / f"{stem}_heatmap.png", out / f"{stem}_prob.npy", out / f"{stem}_heatmap.json"]


def snapshot(paths):
    return {p: p.read_bytes() for p in paths}


# ------------------------------------------------------------------------------------------------ item 1
def test_outputs_are_never_overwritten_and_a_failed_write_keeps_the_previous_ones(env, tmp_path, capsys):
    out = tmp_path / "out"
    slide = env["tumour"]["slide"]
    rc, _, err = infer(env, capsys, slide, "--out", out)
    assert rc == 0, err
    files = outputs(out, "slide_001")
    before = snapshot(files)
    meta = json.loads(files[2].read_text())
    assert meta["num_tiles"] > 0 and meta["mpp"] == pytest.approx(2.0)

    # a second run into the same folder is refused, naming the first existing file and --force
    rc, _, err = infer(env, capsys, slide, "--out", out)
    line = error_line(err)
    assert rc == 1 and "slide_001_heatmap.png" in line and "--force" in line, line
    assert snapshot(files) == before

    # --force, but the disk is full (no file may grow past 4 KB): one line naming the file, and the previous
    # outputs stay as they were (a write in place would have truncated them)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
        rc, _, err = infer(env, capsys, slide, "--out", out, "--force")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    line = error_line(err)
    assert rc == 1 and re.search(r"slide_001_(heatmap\.png|prob\.npy)", line), line
    assert snapshot(files) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)  # no temp file left behind

    # with room: replaced; a temp file left by a process killed between a write and its rename is removed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".slide_001_heatmap.{dead.pid}.tmp.png"
    stale.write_bytes(b"half a png")
    rc, _, err = infer(env, capsys, slide, "--out", out, "--force")
    assert rc == 0, err
    assert not stale.exists() and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)


def test_skip_existing_resumes_a_folder_of_slides(env, tmp_path, capsys):
    out = tmp_path / "out"
    one, two = env["tumour"]["slide"], env["normal"]["slide"]
    rc, _, err = infer(env, capsys, one, "--out", out)
    assert rc == 0, err
    done = {p: p.stat().st_mtime_ns for p in outputs(out, "slide_001")}
    # slide_002 was interrupted: only its PNG and a half-written JSON are there
    shutil.copy(out / "slide_001_heatmap.png", out / "slide_002_heatmap.png")
    (out / "slide_002_heatmap.json").write_text('{"slide": "x", "num_ti')

    rc, stdout, err = infer(env, capsys, one, two, "--out", out, "--skip-existing", "--annotations", env["ann"])
    assert rc == 0, err
    assert re.search(r"slide_001\.tif: .*skipped", stdout + err), stdout + err
    assert {p: p.stat().st_mtime_ns for p in done} == done            # the finished slide was not redone
    meta = json.loads((out / "slide_002_heatmap.json").read_text())  # the unfinished one was
    assert meta["num_tiles"] > 0 and np.load(out / "slide_002_prob.npy").shape == tuple(meta["shape"])
    metrics = json.loads((out / "slide_metrics.json").read_text())
    assert sorted(Path(s).name for s in metrics["slides"]) == ["slide_001.tif", "slide_002.tif"]
    assert [v["label"] for v in metrics["slides"].values()] == [1, 0]

    # finished outputs of another checkpoint are not taken for this run's
    other = tmp_path / "other.pth"
    shutil.copy(env["ckpt"], other)
    rc, _, err = infer(env, capsys, one, "--out", out, "--skip-existing", ckpt=other)
    line = error_line(err)
    assert rc == 1 and "slide_001_heatmap.json" in line and "checkpoint" in line and "--force" in line, line


# ------------------------------------------------------------------------------------------------ item 2
def test_annotations_are_checked_against_the_slides_and_the_folder(env, tmp_path, capsys):
    slide = env["tumour"]["slide"]
    bad = tmp_path / "bad"
    write_asap_xml(bad / "slide_001.xml", [Annotation("far", "_0", "polygon",
                                                      np.array([[100.0, 10], [900, 10], [300, 90]]))])
    rc, _, err = infer(env, capsys, slide, "--out", tmp_path / "o1", "--annotations", bad)
    line = error_line(err)
    assert rc == 1 and "slide_001.xml" in line and "'far'" in line and "(900, 10)" in line, line
    assert not (tmp_path / "o1").exists()  # checked before any slide is processed

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "tumor_001.xml").write_text("<ASAP_Annotations/>")
    rc, _, err = infer(env, capsys, slide, "--out", tmp_path / "o2", "--annotations", wrong)
    line = error_line(err)
    assert rc == 1 and str(wrong) in line and "slide_001" in line, line


def test_a_slide_without_mpp_needs_the_mpp_flag_and_the_mpp_is_recorded(env, tmp_path, capsys):
    slide = _pyramid(tmp_path / "slide_001.tif", tifffile.imread(env["tumour"]["slide"], key=0), mpp=None)
    rc, _, err = infer(env, capsys, slide, "--out", tmp_path / "o1", "--annotations", env["ann"])
    line = error_line(err)
    assert rc == 1 and str(slide) in line and "--mpp" in line, line

    rc, _, err = infer(env, capsys, slide, "--out", tmp_path / "o2", "--annotations", env["ann"], "--mpp", "2.0")
    assert rc == 0, err
    assert json.loads((tmp_path / "o2" / "slide_001_heatmap.json").read_text())["mpp"] == 2.0
    metrics = json.loads((tmp_path / "o2" / "slide_metrics.json").read_text())
    assert metrics["slides"][str(slide)]["mpp"] == 2.0 and metrics["num_lesions"] >= 1


def test_a_typo_in_the_tile_options_is_named(env, tmp_path, capsys):
    rc, _, err = infer(env, capsys, env["tumour"]["slide"], "--out", tmp_path / "o",
                       opts=["data.test.kwargs.tile_sise=32"])
    line = error_line(err)
    assert rc == 1 and "data.test.kwargs.tile_sise" in line and "'tile_size'" in line, line
    assert not (tmp_path / "o").exists()
    # tools/eval.py builds the split: the same check names the key (before: a TypeError naming none)
    from pce.engine import load_config
    from pce.engine.errors import PCEError
    from pce.tasks import get_task

    cfg = load_config(CONFIG, env["opts"] + [f"data.root={tmp_path / 'none'}", "data.test.kwargs.tile_sise=32"])
    with pytest.raises(PCEError, match=r"data\.test\.kwargs\.tile_sise: .*'tile_size'"):
        get_task(cfg.task).build_datasets(cfg, splits=("test",))


# ------------------------------------------------------------------------------------------------ item 3
def test_slides_with_the_same_stem_are_refused(env, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "slide_001.tif"
    other.parent.mkdir()
    shutil.copy(env["normal"]["slide"], other)
    rc, _, err = infer(env, capsys, env["tumour"]["slide"], other, "--out", tmp_path / "o")
    line = error_line(err)
    assert rc == 1 and str(env["tumour"]["slide"]) in line and str(other) in line, line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ item 4
def test_grayscale_scans_find_tissue_and_slides_without_tissue_are_excluded(env, tmp_path, capsys):
    rgb = tifffile.imread(env["tumour"]["slide"], key=0)
    gray = _pyramid(tmp_path / "slides" / "slide_001.tif", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    colour = CamelyonTiles([env["tumour"]["slide"]], level=1, tile_size=64, min_tissue=0.5)
    with pytest.warns(UserWarning, match="slide_001.tif: no colour"):
        grey = CamelyonTiles([gray], level=1, tile_size=64, min_tissue=0.5)
    assert len(colour) > 0 and {(t["x"], t["y"]) for t in grey.tiles} == {(t["x"], t["y"]) for t in colour.tiles}

    glass = np.clip(np.random.default_rng(0).normal(242, 3, (SIZE[1], SIZE[0], 3)), 0, 255).astype(np.uint8)
    blank = _pyramid(tmp_path / "slides" / "blank_003.tif", glass)
    out = tmp_path / "out"
    rc, stdout, err = infer(env, capsys, env["tumour"]["slide"], env["normal"]["slide"], blank, "--out", out,
                            "--annotations", env["ann"])
    assert rc == 0, err
    assert json.loads((out / "blank_003_heatmap.json").read_text())["num_tiles"] == 0
    assert re.search(r"blank_003\.tif: no tissue tile.*excluded", stdout + err), stdout + err
    metrics = json.loads((out / "slide_metrics.json").read_text())
    assert str(blank) not in metrics["slides"] and str(blank) in metrics["excluded"]
    assert len(metrics["slides"]) == 2


@pytest.mark.skipif(not SVS.is_file(), reason="../shared/data/wsi/CMU-1-Small-Region.svs not available")
def test_grayscale_copy_of_the_real_slide_has_the_same_tissue(tmp_path):
    import openslide

    with openslide.OpenSlide(str(SVS)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    gray = _pyramid(tmp_path / "gray.tif", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), mpp=0.499, levels=4)
    m_rgb, _ = tissue_mask(SVS)
    with pytest.warns(UserWarning, match="gray.tif: no colour"):
        m_gray, _ = tissue_mask(gray)
    m_gray = cv2.resize(m_gray.astype(np.uint8), m_rgb.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert m_gray.sum() > 0 and (m_rgb & m_gray).sum() / (m_rgb | m_gray).sum() > 0.8


# ------------------------------------------------------------------------------------------------ item 5
def _drawn(ds, epoch=None, workers=0):
    if epoch is not None:
        ds.set_epoch(epoch)
    return torch.cat([b[0] for b in DataLoader(ds, batch_size=8, num_workers=workers)])


def test_balanced_draws_resume_exactly_with_zero_and_two_workers(env):
    kw = dict(level=1, tile_size=32, stride=16, min_tissue=0.5, mode="classify", balance=0.5, epoch_size=16,
              cache_dir=env["tiles"]["cache_dir"])
    args = ([env["tumour"]["slide"]], [env["tumour"]["xml"]])
    straight = CamelyonTiles(*args, **kw)
    e0, e1 = _drawn(straight, 0), _drawn(straight, 1)
    assert not torch.equal(e0, e1)                                      # a fresh draw every epoch
    assert torch.equal(_drawn(CamelyonTiles(*args, **kw), 1), e1)       # resumed at epoch 1: the same tiles
    assert torch.equal(_drawn(CamelyonTiles(*args, **kw), 1, workers=2), e1)   # with two workers too
    assert not torch.equal(_drawn(CamelyonTiles(*args, **dict(kw, seed=1)), 1), e1)

    # without set_epoch (a trainer that only restores its RNG state): the process's torch RNG keys the draws
    torch.manual_seed(7)
    first = CamelyonTiles(*args, **kw)
    _drawn(first)
    state = torch.get_rng_state()
    a1 = _drawn(first)
    torch.set_rng_state(state)
    assert torch.equal(_drawn(CamelyonTiles(*args, **kw)), a1)


def test_a_camelyon_training_resumed_after_epoch_one_equals_the_straight_run(tmp_path):
    """The trainer as it is (the task adapter does not call the dataset's set_epoch): with num_workers=0 the
    balanced draws come from the trainer's torch RNG, which a resume restores (before: a generator seeded once per
    process, so the resumed epoch redrew epoch 0's tiles)."""
    from pce.datasets.camelyon import make_demo_camelyon
    from pce.engine import load_config
    from pce.engine.trainer import Trainer
    from pce.tasks import get_task

    root = make_demo_camelyon(tmp_path / "demo", num_tumour=1, num_normal=1, num_test_tumour=1, num_test_normal=0,
                              size=SIZE, seed=5)

    def cfg(wd):
        opts = [("runtime.work_dir", str(wd)), ("data.root", str(root)), ("data.batch_size", 4),
                ("data.num_workers", 0), ("schedule.epochs", 2), ("runtime.kmeans_init_batches", 1),
                ("runtime.tensorboard", False), ("runtime.progress_bar", False), ("model.input_shape", [3, 32, 32]),
                ("data.train.kwargs.epoch_size", 8), ("data.train.kwargs.generate", False),
                ("data.val.kwargs.generate", False), ("data.test.kwargs.generate", False),
                ("phases", [{"name": "shared", "epochs": 1, "router_override": "shared", "keys_trainable": False},
                            {"name": "route", "epochs": -1}])]
        for split in ("train", "val", "test"):
            opts += [(f"data.{split}.kwargs.{k}", v) for k, v in
                     dict(level=1, tile_size=32, stride=32, min_tissue=0.5, cache_dir=str(tmp_path / "cache")).items()]
        return load_config(CONFIG, opts)

    class Stop(Exception):
        pass

    def stop_after_first(trainer, event):
        if event == "after_epoch" and trainer.epoch == 1:
            raise Stop()

    full = Trainer(cfg(tmp_path / "full"), get_task("segmentation"))
    full.train()
    first = Trainer(cfg(tmp_path / "split"), get_task("segmentation"), hooks=[stop_after_first])
    with pytest.raises(Stop):
        first.train()
    resumed = Trainer(cfg(tmp_path / "split"), get_task("segmentation"), resume=True)
    resumed.train()
    assert first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------------ item 6
def test_a_corrupt_tile_names_the_slide_and_the_tile(env, tmp_path, capsys):
    slide = tmp_path / "slides" / "slide_001.tif"
    slide.parent.mkdir()
    shutil.copy(env["tumour"]["slide"], slide)
    with tifffile.TiffFile(slide) as t:  # level 1 (256 x 192): 2 x 2 tiles of 128 px; zero their compressed data
        page = t.pages[1]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    data = bytearray(slide.read_bytes())
    for o, n in spans:
        data[o + 8:o + n] = bytes(n - 8)
    slide.write_bytes(bytes(data))
    ds = CamelyonTiles([slide], level=1, tile_size=64, min_tissue=0.5)
    with pytest.raises(OSError) as e:
        ds[0]
    t = ds.tiles[0]
    assert str(slide) in str(e.value) and f"({t['x']}, {t['y']})" in str(e.value), str(e.value)

    rc, _, err = infer(env, capsys, slide, "--out", tmp_path / "o")
    line = error_line(err)
    assert rc == 1 and str(slide) in line and "tile" in line, line


def test_a_truncated_index_cache_is_rebuilt_with_a_warning(env, tmp_path):
    kw = dict(level=1, tile_size=64, stride=64, min_tissue=0.5)
    path, xml = env["tumour"]["slide"], env["tumour"]["xml"]
    first = CamelyonTiles([path], [xml], cache_dir=tmp_path, **kw)
    (cache,) = tmp_path.glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match=re.escape(str(cache))):
        again = CamelyonTiles([path], [xml], cache_dir=tmp_path, **kw)
    assert again.tiles == first.tiles
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CamelyonTiles([path], [xml], cache_dir=tmp_path, **kw)  # rebuilt: read back without a warning


def test_an_index_cache_that_cannot_be_written_warns_and_leaves_no_temp_file(env, tmp_path, monkeypatch):
    import pce.datasets.camelyon.index as index

    kw = dict(level=1, tile_size=64, stride=64, min_tissue=0.5)
    path, xml = env["tumour"]["slide"], env["tumour"]["xml"]
    plain = CamelyonTiles([path], [xml], **kw)  # no cache at all: the reference

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index.os, "replace", full_disk)
    with pytest.warns(UserWarning, match="tile-index cache not written.*No space left"):
        ds = CamelyonTiles([path], [xml], cache_dir=tmp_path, **kw)
    assert ds.tiles == plain.tiles and list(tmp_path.iterdir()) == []  # the index is whole, no temp file is left
    monkeypatch.undo()
    CamelyonTiles([path], [xml], cache_dir=tmp_path, **kw)  # the next run writes it
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_a_nan_checkpoint_is_one_line_and_debug_shows_the_traceback(env, tmp_path, capsys):
    rc, _, err = infer(env, capsys, env["tumour"]["slide"], "--out", tmp_path / "o", ckpt=env["nan"])
    line = error_line(err)
    assert rc == 1 and "nan.pth" in line and "non-finite" in line, line
    rc, _, err = infer(env, capsys, env["tumour"]["slide"], "--out", tmp_path / "o", "--debug", ckpt=env["nan"])
    assert rc == 1 and "Traceback" in err and "non-finite" in err


def test_nan_coordinates_and_unknown_groups_name_the_xml(env, tmp_path):
    text = env["tumour"]["xml"].read_text()
    nan = tmp_path / "nan.xml"
    nan.write_text(re.sub(r'X="[^"]*"', 'X="nan"', text, count=1))
    with pytest.raises(ValueError, match=re.escape(str(nan)) + r".*annotation 'Annotation 0'.*X=nan"):
        read_asap_xml(nan)
    group = tmp_path / "group.xml"
    group.write_text(text.replace('PartOfGroup="_0"', 'PartOfGroup="Lesion"', 1))
    with pytest.raises(ValueError, match=re.escape(str(group)) + r".*group 'Lesion'"):
        CamelyonTiles([env["tumour"]["slide"]], [group], level=1, tile_size=64)
