"""tools/bench_slide.py run for real on the Aperio slide CMU-1-Small-Region (20x, 0.499 um/px, one level) with the
cheapest settings (demo config, fresh model, batch 1 and 2, no workers, one repeat, 128 px tiles at 2 um/px every
128 px: 20 grid tiles): its JSON against figures recomputed here (tiles/s, tissue fraction, the grid from the
slide's own size and mpp, the extrapolation) and the one-line error of a missing slide."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _faults_util import error_line

openslide = pytest.importorskip("openslide")

REPO = Path(__file__).resolve().parents[1]
SVS = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
CONFIG = "configs/demo_camelyon_seg_pce.py"
TILE_MPP, STRIDE, TILE = 2.0, 128, 128  # the demo config's 128 px tiles, read at 2 um/px, one every 128 px
SLIDE_SIZE, SLIDE_MPP, NUM_SLIDES, TISSUE = (20000, 30000), 0.25, 7, (0.25, 0.5)
CHEAP = ["--batch-size", "1", "2", "--workers", "0", "--repeat", "1", "--threads", "1",
         "--tile-mpp", str(TILE_MPP), "--stride", str(STRIDE)]


def run_tool(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning")
    return subprocess.run([sys.executable, "tools/bench_slide.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def grid(w: float, h: float, size: float, step: float) -> int:
    """The tool's documented grid: floor((w - size) / step) + 1 tiles per axis."""
    return (math.floor((w - size) / step) + 1) * (math.floor((h - size) / step) + 1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if not SVS.is_file():
        pytest.skip("../shared/data/wsi/CMU-1-Small-Region.svs not available")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = run_tool(CONFIG, str(SVS), *CHEAP, "--slide-size", *map(str, SLIDE_SIZE), "--slide-mpp", str(SLIDE_MPP),
                    "--num-slides", str(NUM_SLIDES), "--tissue", *map(str, TISSUE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_runs_give_tiles_per_second_of_their_own_seconds(bench):
    info, _ = bench
    n = info["tissue_tiles"]
    kinds = [(r["what"], r.get("batch_size"), r.get("workers")) for r in info["runs"]]
    assert kinds == [("read", None, 0), ("model", 1, None), ("model", 2, None), ("infer", 1, 0), ("infer", 2, 0)]
    for r in info["runs"]:
        assert r["seconds"] > 0 and r["tiles_per_s"] > 0
        if r["what"] == "read":
            assert r["tiles_per_s"] == pytest.approx(n / r["seconds"], rel=1e-12)
        elif r["what"] == "model":
            assert r["tiles_per_s"] == pytest.approx(r["batch_size"] / r["seconds"], rel=1e-12)
        else:  # the whole path: the slide's tiles over infer_slide's own inference seconds (the wall time holds
            # the index as well)
            assert 0 < r["infer_s"] <= r["seconds"] + 1e-3
            assert r["tiles_per_s"] == pytest.approx(n / r["infer_s"], rel=1e-12)
    infer = [r["tiles_per_s"] for r in info["runs"] if r["what"] == "infer"]
    assert info["best_tiles_per_s"] == max(infer)


def test_grid_and_tissue_fraction_from_the_slide_itself(bench):
    info, out = bench
    with openslide.OpenSlide(str(SVS)) as s:
        (w0, h0), base = s.dimensions, float(s.properties[openslide.PROPERTY_NAME_MPP_X])
        assert s.level_count == 1  # level 0 read and resampled: level pixels = level-0 pixels
    scale = TILE_MPP / base  # level pixels per tile pixel
    read = round(TILE * scale)
    expected = grid(w0, h0, read, STRIDE * scale)
    assert expected == 20  # 4 x 5 tiles of 513 level-0 px every 513.03 px on 2220 x 2967 px
    assert info["level0_size"] == [w0, h0] and info["level"] == 0
    assert info["tile_mpp"] == pytest.approx(TILE_MPP) and info["scale"] == pytest.approx(scale)
    assert (info["tile_size"], info["read_size"], info["stride"]) == (TILE, read, STRIDE)
    assert info["grid_tiles"] == expected
    assert 0 < info["tissue_tiles"] <= expected
    assert info["tissue_fraction"] == pytest.approx(info["tissue_tiles"] / info["grid_tiles"], rel=1e-12)
    assert f"{info['tissue_tiles']} tissue tiles of {expected} ({info['tissue_fraction']:.1%})" in out
    assert info["checkpoint"] == "none (freshly initialised)" and info["threads"] == 1


def test_extrapolation_from_the_best_tiles_per_second(bench):
    info, out = bench
    ex, best = info["extrapolation"], info["best_tiles_per_s"]
    w, h = (v * SLIDE_MPP / TILE_MPP for v in SLIDE_SIZE)  # the big slide in tile pixels
    assert ex["grid_tiles"] == grid(w, h, TILE, STRIDE) == 19 * 29  # 2500 x 3750 tile px
    assert (ex["slide_size"], ex["slide_mpp"], ex["num_slides"]) == (list(SLIDE_SIZE), SLIDE_MPP, NUM_SLIDES)
    assert [row["tissue_fraction"] for row in ex["by_tissue"]] == list(TISSUE)
    for f, row in zip(TISSUE, ex["by_tissue"]):
        assert row["tiles"] == pytest.approx(f * ex["grid_tiles"], rel=1e-12)
        assert row["seconds_per_slide"] == pytest.approx(row["tiles"] / best, rel=1e-12)
        assert row["hours_for_set"] == pytest.approx(row["seconds_per_slide"] * NUM_SLIDES / 3600, rel=1e-12)
        assert f"{row['tiles']:9.0f} tiles, {row['seconds_per_slide'] / 60:7.1f} min per slide" in out
    assert f"({ex['grid_tiles']} grid tiles of {TILE} px at {TILE_MPP:.3f} um/px" in out


def test_a_missing_slide_is_one_error_line(tmp_path):
    missing = tmp_path / "missing.svs"
    proc = run_tool(CONFIG, str(missing), *CHEAP, "--out", str(tmp_path / "bench.json"))
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert line.startswith(f"error: {missing}: ") and "slide not found" in line, line
    assert not (tmp_path / "bench.json").exists()
