"""Issue #22, Camelyon for real: a validation split carved from the training slides (by slide, stratified, seeded,
recorded) that a training run uses instead of the test slides, a fixed validation tile subset, the challenge / AWS /
Camelyon17 layouts, the missing-annotation error, tiles at a resolution in microns per pixel (read from the closest
finer-or-equal level and resampled), block reads for whole-slide inference, and the real Aperio slide at mpp 1.0.

Generated slides are small (512 x 384 px, 2 um/px, 3 levels) so that every test takes a few seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import torch

from _faults_util import load_tool
from pce.datasets import build_dataset
from pce.datasets.camelyon import (Camelyon16Tiles, CamelyonTiles, SlideEntry, TileBlocks, camelyon17_slides,
                                   holdout_split, make_demo_camelyon, make_demo_camelyon17, make_synthetic_slide,
                                   rasterize, read_asap_xml, read_slide_labels, spread_subset, write_split_records)

CONFIG = "configs/demo_camelyon_seg_pce.py"
SIZE = (512, 384)
SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TILES = dict(level=1, tile_size=32, stride=32, min_tissue=0.5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo set in both Camelyon16 layouts: 3 tumour + 2 normal training slides, 1 + 1 test slides."""
    root = tmp_path_factory.mktemp("layouts")
    kw = dict(num_tumour=3, num_normal=2, num_test_tumour=1, num_test_normal=1, size=SIZE, seed=7)
    return {"challenge": make_demo_camelyon(root / "challenge", **kw),
            "aws": make_demo_camelyon(root / "aws", layout="aws", **kw), "cache": root / "cache"}


class OpenSpy:
    """Records the path of every slide OpenSlide opens in this process."""

    def __init__(self, monkeypatch):
        self.paths = []
        spy, real = self, openslide.OpenSlide

        class Recording(real):
            def __init__(self, filename):
                spy.paths.append(Path(filename).resolve())
                super().__init__(filename)

        monkeypatch.setattr(openslide, "OpenSlide", Recording)


# --------------------------------------------------------------------------------------------- 1. the split
def _entries(n_tumour, n_normal):
    return ([SlideEntry(Path(f"tumor_{i:03d}.tif"), True, Path("x.xml"), Path(".")) for i in range(n_tumour)]
            + [SlideEntry(Path(f"normal_{i:03d}.tif"), False, None, Path(".")) for i in range(n_normal)])


def test_holdout_is_by_slide_stratified_seeded_and_order_free(tmp_path):
    entries = _entries(110, 160)  # Camelyon16's training set
    train, val = holdout_split(entries, 0.2, seed=0)
    assert sum(e.tumour for e in val) == 22 and sum(not e.tumour for e in val) == 32
    assert not {e.stem for e in train} & {e.stem for e in val} and len(train) + len(val) == 270
    again = holdout_split(list(reversed(entries)), 0.2, seed=0)[1]          # the listing order does not matter
    assert [e.stem for e in again] == [e.stem for e in val]
    other = holdout_split(entries, 0.2, seed=1)[1]
    assert {e.stem for e in other} != {e.stem for e in val}                # the seed does
    # tiny sets: never a whole stratum, at least one validation slide when there are two slides
    assert [e.stem for e in holdout_split(_entries(3, 2), 0.2, seed=0)[1]] == ["tumor_002"]
    assert [e.stem for e in holdout_split(_entries(1, 1), 0.25, seed=0)[1]] == ["normal_000"]
    assert holdout_split(_entries(3, 2), 0, seed=0)[1] == []
    # a slide list (a .txt of stems, or a run's camelyon_split.json)
    (tmp_path / "val.txt").write_text("tumor_004\nnormal_010\n")
    assert sorted(e.stem for e in holdout_split(entries, str(tmp_path / "val.txt"))[1]) == ["normal_010", "tumor_004"]
    (tmp_path / "split.json").write_text(json.dumps({"val": {"slides": ["tumor_001"]}}))
    assert [e.stem for e in holdout_split(entries, str(tmp_path / "split.json"))[1]] == ["tumor_001"]
    with pytest.raises(ValueError, match="tumor_999"):
        holdout_split(entries, str((tmp_path / "bad.txt").write_text("tumor_999\n") and tmp_path / "bad.txt"))


def test_train_and_val_splits_partition_the_training_slides_and_are_recorded(demo, tmp_path):
    kw = dict(root=demo["challenge"], holdout=0.25, seed=3, cache_dir=demo["cache"], transforms=None, **TILES)
    train = build_dataset("camelyon16", split="train", **kw)
    val = build_dataset("camelyon16", split="val", max_tiles=12, **kw)
    test = build_dataset("camelyon16", split="test", **kw)
    tr, va = train.split_record, val.split_record
    assert tr["train"] == va["train"] == tr["slides"] and va["val"] == va["slides"]
    assert sorted(tr["slides"] + va["slides"]) == ["normal_001", "normal_002", "tumor_001", "tumor_002", "tumor_003"]
    assert len(va["tumour_slides"]) == 1 and len(va["slides"]) == 2           # round(0.25 x 3), round(0.25 x 2)
    assert all(Path(s).parent.name != "images" for s in map(str, val.slides))
    assert test.split_record["slides"] == ["test_001", "test_002"]
    # the validation tiles: a fixed subset of 12, half of them tumour tiles, the normal ones spread over both slides
    full = build_dataset("camelyon16", split="val", max_tiles=None, **kw)
    assert len(val) == 12 and va["tiles"]["num_tissue_tiles"] == len(full) > 12
    n_pos = int(full.positive_tiles().sum())
    assert va["tiles"]["num_tumour_tiles"] == min(6, n_pos) > 0
    normal = np.bincount(val.tiles.columns["slide_index"][~val.positive_tiles()], minlength=2)
    assert normal.sum() == 12 - min(6, n_pos) and abs(int(normal[0]) - int(normal[1])) <= 1
    assert build_dataset("camelyon16", split="val", max_tiles=12, **kw).tiles == val.tiles
    files = write_split_records(tmp_path, {"train": train, "val": val, "test": test})
    assert files == [tmp_path / "camelyon_split.json"]
    written = json.loads(files[0].read_text())
    assert written["val"]["slides"] == va["slides"] and written["val"]["seed"] == 3
    # train and val of different seeds would overlap: refused
    other = build_dataset("camelyon16", split="val", **dict(kw, seed=4))
    if set(other.split_record["slides"]) != set(va["slides"]):
        with pytest.raises(ValueError, match="hold out different validation slides"):
            write_split_records(tmp_path, {"train": train, "val": other})


def test_spread_subset_is_even_over_slides_and_stratified():
    slide = np.repeat(np.arange(4), [100, 100, 100, 10])
    positive = np.zeros(310, bool)
    positive[[0, 1, 2, 150, 151]] = True
    pick = spread_subset(slide, positive, 40, 0.5, seed=0)
    assert len(pick) == 40 and positive[pick].sum() == 5                    # every tumour tile (too few for half)
    normal = np.bincount(slide[pick][~positive[pick]], minlength=4)
    assert sorted(normal.tolist()) == [8, 9, 9, 9]                          # round robin over the slides
    assert np.array_equal(pick, spread_subset(slide, positive, 40, 0.5, seed=0))
    assert not np.array_equal(pick, spread_subset(slide, positive, 40, 0.5, seed=1))
    assert positive[spread_subset(slide, positive, 100, None, seed=0)].sum() == 2  # the slides' own ratio
    assert len(spread_subset(slide, positive, 1000, 0.5, seed=0)) == 310


def test_a_training_run_never_opens_a_test_slide(demo, tmp_path, monkeypatch):
    """tools/train.py's Trainer on the demo config: the validation that picks best.pth reads held-out training
    slides, not the test slides (before: data.val was testing/images). The engine's final evaluation of data.test
    is switched off here (data.test.name=''): it belongs to tools/eval.py; see the next test."""
    from pce.engine import load_config
    from pce.engine.trainer import Trainer
    from pce.tasks import get_task

    cfg = load_config(CONFIG, _train_options(demo, tmp_path) + [("data.test.name", "")])
    spy = OpenSpy(monkeypatch)
    trainer = Trainer(cfg, get_task(cfg.task))
    out = trainer.train()
    root = demo["challenge"].resolve()
    tests = {p.resolve() for p in (root / "testing" / "images").glob("*.tif")}
    opened = set(spy.paths)
    assert opened and not opened & tests, sorted(opened & tests)
    val = trainer.datasets["val"].split_record
    assert {Path(p).resolve() for p in trainer.datasets["val"].slides} <= opened
    assert set(val["slides"]) == set(val["val"]) and not set(val["val"]) & set(val["train"])
    assert out["final"]["split"] == "val" and out["best"]["metric"] == "mIoU"
    rec = json.loads(write_split_records(tmp_path / "wd", trainer.datasets)[0].read_text())
    assert set(rec) == {"train", "val"} and rec["val"]["tiles"]["max_tiles"] == 2000


def _train_options(demo, tmp_path):
    opts = [("runtime.work_dir", str(tmp_path / "wd")), ("data.root", str(demo["challenge"])),
            ("data.batch_size", 4), ("data.num_workers", 0), ("schedule.epochs", 1), ("schedule.iters_per_epoch", 2),
            ("runtime.kmeans_init_batches", 1), ("runtime.tensorboard", False), ("runtime.progress_bar", False),
            ("model.input_shape", [3, 32, 32]), ("data.train.kwargs.epoch_size", 8),
            ("phases", [{"name": "train", "epochs": -1}])]
    for split in ("train", "val", "test"):
        opts += [(f"data.{split}.kwargs.{k}", v) for k, v in dict(TILES, cache_dir=str(demo["cache"]),
                                                                   generate=False).items()]
    return opts


def test_the_shipped_config_leaves_the_test_slides_to_tools_eval(demo, tmp_path, monkeypatch):
    """With the engine's ``runtime.final_test`` (requested in issue #22: the trainer builds data.test only when it
    is set), the shipped demo config trains without opening a test slide at all."""
    from pce.engine import load_config
    from pce.engine.defaults import get_default_config
    from pce.engine.trainer import Trainer
    from pce.tasks import get_task

    assert get_default_config().runtime.final_test is True  # other configs keep their final test score
    from pce.tasks.hooks import default_hooks

    cfg = load_config(CONFIG, _train_options(demo, tmp_path))
    assert cfg.data.test.name == "camelyon16" and cfg.data.test.kwargs.split == "test"
    spy = OpenSpy(monkeypatch)
    task = get_task(cfg.task)
    hooks = default_hooks(cfg, task)
    Trainer(cfg, task, hooks=hooks).train()
    tests = {p.resolve() for p in (demo["challenge"] / "testing" / "images").glob("*.tif")}
    assert spy.paths and not set(spy.paths) & tests
    rec = json.loads((tmp_path / "wd" / "camelyon_split.json").read_text())  # written by SplitRecordHook
    assert set(rec) == {"train", "val"} and not set(rec["train"]["slides"]) & set(rec["val"]["slides"])


# --------------------------------------------------------------------------------------------- 2. layouts
def test_both_camelyon16_layouts_load_the_same_slides(demo):
    got = {}
    for layout in ("challenge", "aws"):
        kw = dict(root=demo[layout], layout=layout, cache_dir=demo["cache"], **TILES)
        training = Camelyon16Tiles(split="training", **kw)
        test = Camelyon16Tiles(split="test", **kw)
        got[layout] = (training.split_record["slides"], training.split_record["tumour_slides"],
                       test.split_record["tumour_slides"], len(training), len(test),
                       int(training.positive_tiles().sum()))
    assert got["challenge"] == got["aws"]
    slides, tumour, test_tumour, n, n_test, n_pos = got["aws"]
    assert slides == ["normal_001", "normal_002", "tumor_001", "tumor_002", "tumor_003"]
    assert tumour == ["tumor_001", "tumor_002", "tumor_003"] and test_tumour == ["test_001"] and n_pos > 0
    # the AWS root may also be given as the CAMELYON16 folder itself
    assert len(Camelyon16Tiles(demo["aws"] / "CAMELYON16", layout="aws", **TILES)) == n


def test_a_tumour_slide_without_annotations_is_one_line_naming_the_slide_and_the_folder(demo, tmp_path):
    for layout, xml_dir in (("challenge", "lesion_annotations"), ("aws", "CAMELYON16/annotations")):
        root = tmp_path / layout
        for p in demo[layout].rglob("*"):
            if p.is_file() and p.name != "tumor_002.xml":
                (root / p.relative_to(demo[layout])).parent.mkdir(parents=True, exist_ok=True)
                (root / p.relative_to(demo[layout])).symlink_to(p)
        with pytest.raises(FileNotFoundError) as e:
            Camelyon16Tiles(root, layout=layout, split="train", **TILES)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(root / ("training/tumor" if layout == "challenge" else
                                                              "CAMELYON16/images") / "tumor_002.tif"))
        assert f"tumor_002.xml not found in {root / xml_dir}" in msg, msg
    # a test slide listed as tumour in a labels file, without annotations
    labels = tmp_path / "reference.csv"
    labels.write_text("Test_001,Tumor,Macro\nTest_002,Tumor,Micro\n")
    with pytest.raises(FileNotFoundError, match=r"test_002\.tif: tumour slide without lesion annotations: "
                                                r"test_002\.xml not found in \S+testing/lesion_annotations"):
        Camelyon16Tiles(demo["challenge"], split="test", labels=str(labels), **TILES)
    with pytest.raises(ValueError, match="layout='c16'"):
        Camelyon16Tiles(demo["challenge"], layout="c16")


def test_camelyon17_centres_patients_nodes_and_labels(tmp_path, capsys):
    root = make_demo_camelyon17(tmp_path / "c17", patients=2, nodes=2, size=SIZE, seed=2)
    (root / "lesion_annotations" / "patient_001_node_0.xml").unlink()   # a positive node without annotations
    slides = camelyon17_slides(root)
    assert [(e.centre, e.patient, e.node, e.label) for e in slides] == [
        (0, 0, 0, "macro"), (0, 0, 1, "negative"), (1, 1, 0, "macro"), (1, 1, 1, "negative")]
    assert [e.tumour for e in slides] == [True, False, True, False] and slides[2].xml is None
    labels, stages = read_slide_labels(root / "stages.csv")
    assert stages == {"patient_000": "pn1", "patient_001": "pn1"} and labels["patient_000_node_1"] == "negative"
    ds = Camelyon16Tiles(root, layout="camelyon17", split="training", **TILES)
    assert ds.split_record["slides"] == ["patient_000_node_0", "patient_000_node_1", "patient_001_node_1"]
    assert ds.split_record["left_out"]["slides"] == ["patient_001_node_0"] and ds.positive_tiles().any()

    # the slide-level tool reads the labels: slide AUC over all four nodes (the unannotated one included)
    ckpt = _random_checkpoint(tmp_path)
    rc = load_tool("infer_slide").main([CONFIG, "--checkpoint", str(ckpt), *[str(e.path) for e in slides],
                                        "--out", str(tmp_path / "out"), "--labels", str(root / "stages.csv"),
                                        "--png-size", "64", "--cfg-options", *_infer_options()])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "slide_metrics.json").read_text())
    assert [v["label"] for v in m["slides"].values()] == [1, 0, 1, 0] and 0 <= m["slide_AUC"] <= 1
    assert "FROC" not in m


def _infer_options():
    return ["model.input_shape=[3,32,32]"] + [f"data.test.kwargs.{k}={v}" for k, v in TILES.items()]


def _random_checkpoint(tmp_path):
    from pce.engine import atomic_save, load_config
    from pce.tasks import get_task

    cfg = load_config(CONFIG, _infer_options())
    torch.manual_seed(0)
    model = get_task(cfg.task).build_model(cfg)
    atomic_save({"model": model.state_dict(), "epoch": 1}, tmp_path / "random.pth")
    return tmp_path / "random.pth"


# --------------------------------------------------------------------------------------------- 3. resolution
@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpp")
    return make_synthetic_slide(root / "tumor_001.tif", root / "tumor_001.xml", size=SIZE, seed=3, levels=3,
                                tile=128)


@pytest.mark.parametrize("mpp, level, read, interpolation", [
    (0.5, 0, 16, cv2.INTER_CUBIC),   # finer than level 0 (2 um/px): 16 px of level 0 enlarged to 64
    (3.0, 0, 96, cv2.INTER_AREA),    # between levels 0 and 1: the finer one, 96 px shrunk to 64
    (5.0, 1, 80, cv2.INTER_AREA),    # level 1 (4 um/px), 80 px shrunk to 64
    (4.02, 1, 64, None),             # within 1% of level 1: read as it is
])
def test_tiles_at_an_mpp_are_a_resampled_larger_region(slide, mpp, level, read, interpolation):
    ds = CamelyonTiles([slide["slide"]], [slide["xml"]], mpp=mpp, tile_size=64, stride=48, min_tissue=0.5)
    g = ds.geometries[0]
    assert (g.level, ds.read_sizes[0]) == (level, read) and len(ds) > 0
    assert ds.tiles[0]["mpp"] == pytest.approx(mpp if interpolation else 4.0)
    page = tifffile.imread(slide["slide"], key=level)
    d = 2 ** level
    anns = read_asap_xml(slide["xml"])
    for i in (0, len(ds) // 2, len(ds) - 1):
        t = ds.tiles[i]
        assert (t["x"], t["y"]) == (round(t["col"] * 48 * g.scale * d), round(t["row"] * 48 * g.scale * d))
        ly, lx = t["y"] // d, t["x"] // d
        region = page[ly:ly + read, lx:lx + read]
        want = region if interpolation is None else cv2.resize(region, (64, 64), interpolation=interpolation)
        image, target = ds[i]
        np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), want)
        mask = rasterize(anns, (t["x"], t["y"]), (64, 64), downsample=read * d / 64)
        assert torch.equal(target, torch.from_numpy(mask.astype(np.int64)))


def test_resolution_options_and_their_errors(slide, tmp_path):
    with pytest.raises(ValueError, match="give one of level=1, mpp=4.0"):
        CamelyonTiles([slide["slide"]], level=1, mpp=4.0)
    with pytest.raises(ValueError, match=r"level 3 out of range \(the slide has levels 0..2; choose the resolution "
                                         r"by mpp="):
        CamelyonTiles([slide["slide"]], level=3, tile_size=16)
    plain = tmp_path / "plain.tif"   # no resolution tags: mpp needs level0_mpp
    tifffile.imwrite(plain, tifffile.imread(slide["slide"], key=0), photometric="rgb", tile=(128, 128))
    with pytest.raises(ValueError, match=r"plain\.tif: mpp=4.0 asked but the slide records no microns per pixel"):
        CamelyonTiles([plain], mpp=4.0, tile_size=32)
    ds = CamelyonTiles([plain], mpp=4.0, tile_size=32, level0_mpp=2.0)
    assert ds.geometries[0].scale == 2.0 and ds.read_sizes == [64] and ds.tiles[0]["mpp"] == 4.0


# ------------------------------------------------------------------------------------------ 4. block reads
@pytest.mark.parametrize("mpp", [4.0, 3.0])
def test_block_reads_equal_tile_reads_and_read_overlaps_once(slide, monkeypatch, mpp):
    ds = CamelyonTiles([slide["slide"]], mpp=mpp, tile_size=32, stride=8, min_tissue=0.5)
    per_tile = torch.stack([ds[i][0] for i in range(len(ds))])
    area = []
    real = openslide.OpenSlide.read_region

    def counting(self, location, level, size):
        area.append(size[0] * size[1])
        return real(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", counting)
    blocks = TileBlocks(ds, block=4)
    got = torch.zeros_like(per_tile)
    for b in range(len(blocks)):
        images, idx = blocks[b]
        got[idx] = images
    assert len(blocks) < len(ds) and blocks.num_tiles == len(ds)
    if mpp == 4.0:   # no resampling: exactly the tiles
        assert torch.equal(got, per_tile)
    else:            # resampled as a block: the same up to interpolation at tile borders
        assert (got - per_tile).abs().mean() < 0.01
    per_tile_area = len(ds) * ds.read_sizes[0] ** 2
    assert sum(area) < per_tile_area / 4, (sum(area), per_tile_area)   # 16x overlap: each pixel read ~once


# --------------------------------------------------------------------------------------- the real slide
@pytest.mark.skipif(not SVS.is_file(), reason="../shared/data/wsi/CMU-1-Small-Region.svs not available")
def test_real_aperio_slide_by_mpp_and_infer_slide_at_mpp_1(tmp_path, capsys):
    """The 20x Aperio slide (0.499 um/px, one level): level indices fail (before: the configs' level=1 gave
    'level 1 out of range'); mpp=0.5 reads 256 px of level 0 as they are, mpp=1.0 resamples 513 px to 256."""
    with pytest.raises(ValueError, match="level 1 out of range .* by mpp="):
        CamelyonTiles([SVS], level=1, tile_size=256)
    half = CamelyonTiles([SVS], mpp=0.5, tile_size=256, min_tissue=0.5)
    one = CamelyonTiles([SVS], mpp=1.0, tile_size=256, min_tissue=0.5)
    assert (half.geometries[0].scale, half.read_sizes) == (1.0, [256])
    assert one.read_sizes == [513] and one.tiles[0]["mpp"] == pytest.approx(1.0, rel=1e-3)
    assert len(half) > 20 and 0 < len(one) < len(half)

    ckpt = _random_checkpoint(tmp_path)
    rc = load_tool("infer_slide").main([CONFIG, "--checkpoint", str(ckpt), str(SVS), "--out", str(tmp_path / "o"),
                                        "--tile-mpp", "1.0", "--png-size", "128", "--cfg-options",
                                        *_infer_options()])
    out, err = capsys.readouterr()
    assert rc == 0, err
    meta = json.loads((tmp_path / "o" / "CMU-1-Small-Region_heatmap.json").read_text())
    assert meta["tile_mpp"] == pytest.approx(1.0, rel=1e-3) and meta["level"] == 0 and meta["read_size"] == 64
    assert meta["mpp"] == pytest.approx(0.499, abs=1e-3) and meta["num_tiles"] > 100
    assert meta["settings"]["tiles"]["mpp"] == 1.0 and "level" not in meta["settings"]["tiles"]
    prob = np.load(tmp_path / "o" / "CMU-1-Small-Region_prob.npy")
    assert prob.shape == tuple(meta["shape"]) and meta["downsample"] == pytest.approx(1.0 / 0.499 * 2, rel=1e-3)
    assert "1.000 um/px" in out


def test_infer_slide_block_reads_give_the_tile_by_tile_map(slide, tmp_path, capsys):
    """Overlapping tiles (stride 8, tile 32) cut from block reads: the heat-map equals the tile-by-tile one."""
    ckpt = _random_checkpoint(tmp_path)
    maps = []
    for block in ("8", "0"):
        out = tmp_path / f"block{block}"
        rc = load_tool("infer_slide").main([CONFIG, "--checkpoint", str(ckpt), str(slide["slide"]), "--out", str(out),
                                            "--stride", "8", "--block", block, "--batch-size", "7", "--png-size",
                                            "64", "--cfg-options", *_infer_options()])
        assert rc == 0, capsys.readouterr().err
        maps.append(np.load(out / "tumor_001_prob.npy"))
        meta = json.loads((out / "tumor_001_heatmap.json").read_text())
        assert meta["stride"] == 8 and meta["tile_mpp"] == 4.0 and meta["timing"]["tiles_per_s"] > 0
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    assert maps[0].shape == (192 // 2, 256 // 2)  # level 1 in cells of 2 px (gcd of 32, 8 and 32 / 16)
