"""Generated and real whole slides: tissue masks, the tile grid at two levels, masks and labels, DataLoader
workers, the on-disk index cache, balanced sampling and the bad-input errors."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from pce.datasets import build_dataset
from pce.datasets.camelyon import (Annotation, BalancedTileSampler, CamelyonTiles, centre_slice, choose_level,
                                   make_synthetic_slide, rasterize, read_asap_xml, tissue_mask, write_asap_xml)

SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
SIZE = (768, 512)  # level 0 of the generated slides; levels 768x512, 384x256, 192x128


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    tum = make_synthetic_slide(root / "tumor_001.tif", root / "tumor_001.xml", size=SIZE, seed=3, levels=3, tile=128)
    nor = make_synthetic_slide(root / "normal_001.tif", None, size=SIZE, tumour=False, seed=4, levels=3, tile=128)
    return {"root": root, "tumour": tum, "normal": nor}


def test_generated_slide_opens_as_a_pyramid_with_mpp_and_tissue_mask(slides):
    with openslide.OpenSlide(str(slides["tumour"]["slide"])) as s:
        assert s.level_count == 3 and s.level_dimensions == ((768, 512), (384, 256), (192, 128))
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(2.0)
        assert choose_level(s, downsample=2.5) == 1 and choose_level(s, mpp=8.4) == 2
    mask, ds = tissue_mask(slides["tumour"]["slide"])
    assert ds == 32.0 and mask.shape == (16, 24)
    truth = slides["tumour"]["tissue"].reshape(16, 32, 24, 32).mean(axis=(1, 3)) > 0.5  # level-0 tissue, pooled
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    mask1, ds1 = tissue_mask(slides["tumour"]["slide"], level=1)
    truth1 = slides["tumour"]["tissue"].reshape(256, 2, 384, 2).mean(axis=(1, 3)) > 0.5
    assert ds1 == 2.0 and (mask1 & truth1).sum() / (mask1 | truth1).sum() > 0.97
    # the exclusion lies inside a lesion: hole at its centroid, tumour around it
    anns = read_asap_xml(slides["tumour"]["xml"])
    hole = next(a for a in anns if a.group == "_2")
    cx, cy = hole.coords.mean(0)
    assert rasterize(anns, (cx, cy), (1, 1))[0, 0] == 0
    assert rasterize([a for a in anns if a.group != "_2"], (cx, cy), (1, 1))[0, 0] == 1


@pytest.mark.parametrize("level, tile, stride", [(0, 128, 128), (1, 64, 32)])
def test_tile_grid_exact_coordinates_pixels_and_masks(slides, level, tile, stride):
    path, xml = slides["tumour"]["slide"], slides["tumour"]["xml"]
    ds = CamelyonTiles([path], [xml], level=level, tile_size=tile, stride=stride, min_tissue=0.0)
    d = 2 ** level
    lw, lh = SIZE[0] // d, SIZE[1] // d
    grid = [(x * d, y * d) for y in range(0, lh - tile + 1, stride) for x in range(0, lw - tile + 1, stride)]
    assert sorted((t["x"], t["y"]) for t in ds.tiles) == sorted(grid)
    page = tifffile.imread(path, key=level)  # the level's pixels, read without OpenSlide
    anns = read_asap_xml(xml)
    for i in (0, len(ds) // 2, len(ds) - 1):
        t = ds.tiles[i]
        image, target = ds[i]
        ly, lx = t["y"] // d, t["x"] // d
        np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(),
                                      page[ly:ly + tile, lx:lx + tile])
        expected = rasterize(anns, (t["x"], t["y"]), (tile, tile), downsample=d)
        assert target.dtype == torch.int64 and torch.equal(target, torch.from_numpy(expected.astype(np.int64)))
        if tile <= 64:  # the index samples every pixel: exact fractions and labels
            assert t["tumour"] == pytest.approx(expected.mean())
            c = centre_slice(tile)
            assert t["label"] == int(expected[c, c].any())


def test_min_tissue_keeps_tiles_by_their_tissue_fraction(slides):
    path = slides["tumour"]["slide"]
    mask, ds_mask = tissue_mask(path)
    ds = CamelyonTiles([path], level=0, tile_size=128, min_tissue=0.5)  # 128 px = 4 x 4 mask pixels
    frac = mask.reshape(4, 4, 6, 4).mean(axis=(1, 3))
    kept = {(c * 128, r * 128) for r in range(4) for c in range(6) if frac[r, c] >= 0.5}
    assert {(t["x"], t["y"]) for t in ds.tiles} == kept and 0 < len(kept) < 24
    for t in ds.tiles:
        assert t["tissue"] == pytest.approx(frac[t["y"] // 128, t["x"] // 128])


def test_classify_mode_labels_and_balanced_sampling(slides):
    s = slides
    ds = CamelyonTiles([s["tumour"]["slide"], s["normal"]["slide"]], {"tumor_001": s["tumour"]["xml"]}, level=1,
                       tile_size=48, stride=16, min_tissue=0.5, mode="classify", balance=0.5, epoch_size=200)
    assert ds.classes == ("normal", "tumour") and len(ds) == 200
    labels = np.array([t["label"] for t in ds.tiles])
    assert 0 < labels.sum() < 0.5 * len(labels)  # mostly normal tiles
    assert all(t["label"] == 0 for t in ds.tiles if t["slide_index"] == 1)
    drawn = [ds[i][1] for i in range(200)]
    assert sum(drawn) == 100  # the first half of every epoch's draws are tumour tiles
    sampler = BalancedTileSampler(ds, tumour_fraction=0.25, num_samples=4000, seed=1)
    idx = list(sampler)
    assert len(idx) == 4000 and abs(labels[idx].mean() - 0.25) < 0.03
    sampler.set_epoch(1)
    assert list(sampler) != idx


def test_class_names_from_the_config_follow_the_mode():
    """Figures title Camelyon images with class names read from the config alone (no slide opened)."""
    from pce.engine import load_config
    from pce.tasks.visualize import class_names_from_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/demo_camelyon_seg_pce.py")
    assert class_names_from_config(cfg) == ["background", "tumour"]
    cfg.defrost()
    cfg.data.val.kwargs.mode = "classify"
    cfg.data.test.name = cfg.data.train.name = ""
    assert class_names_from_config(cfg) == ["normal", "tumour"]


def test_dataloader_two_workers_lazy_handles(slides):
    ds = CamelyonTiles([slides["tumour"]["slide"]], [slides["tumour"]["xml"]], level=1, tile_size=64,
                       min_tissue=0.5)
    expected = [ds[i] for i in range(len(ds))]
    ds.close()
    assert ds._handles == {}
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert ds._handles == {}  # the workers opened their own handles; the main process opened none
    images = torch.cat([b[0] for b in batches])
    assert torch.equal(images, torch.stack([e[0] for e in expected]))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.stack([e[1] for e in expected]))
    ds[0]
    assert len(ds._handles) == 1 and pickle.loads(pickle.dumps(ds))._handles == {}


def test_index_cache_second_construction_reads_no_pixels(slides, tmp_path, monkeypatch):
    kw = dict(level=1, tile_size=64, stride=32, min_tissue=0.5, cache_dir=tmp_path / "cache")
    first = CamelyonTiles([slides["tumour"]["slide"]], [slides["tumour"]["xml"]], **kw)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_pixels(*a, **k):
        raise AssertionError("read slide pixels although the index is cached")

    monkeypatch.setattr(openslide.OpenSlide, "read_region", no_pixels)
    monkeypatch.setattr(openslide.OpenSlide, "get_thumbnail", no_pixels)
    second = CamelyonTiles([slides["tumour"]["slide"]], [slides["tumour"]["xml"]], **kw)
    assert second.tiles == first.tiles
    with pytest.raises(AssertionError):  # other grid settings are another cache entry
        CamelyonTiles([slides["tumour"]["slide"]], [slides["tumour"]["xml"]], **dict(kw, stride=64))


def test_bad_input_errors_name_the_file_or_value(slides, tmp_path):
    tum, xml = slides["tumour"]["slide"], slides["tumour"]["xml"]
    with pytest.raises(FileNotFoundError, match="missing.tif: slide not found"):
        CamelyonTiles([tmp_path / "missing.tif"])
    with pytest.raises(ValueError, match=r"other\.xml: annotations given for slide 'tumor_999'"):
        CamelyonTiles([tum], {"tumor_999": tmp_path / "other.xml"})
    far = write_asap_xml(tmp_path / "far.xml", [Annotation("far", "_0", "polygon",
                                                           np.array([[700.0, 10], [900, 10], [900, 90]]))])
    with pytest.raises(ValueError, match=r"far\.xml: annotation 'far' spans x 700..900.*outside the slide"):
        CamelyonTiles([tum], [far])
    with pytest.raises(ValueError, match=r"tile_size=300 is larger than level 1 \(384 x 256"):
        CamelyonTiles([tum], level=1, tile_size=300)
    (tmp_path / "fake.tif").write_bytes(b"not a slide at all")
    with pytest.raises(ValueError, match=r"fake\.tif: unsupported slide format"):
        CamelyonTiles([tmp_path / "fake.tif"])
    with pytest.raises(ValueError, match=r"mode='detect'"):
        CamelyonTiles([tum], mode="detect")


def test_camelyon16_layout_registry_and_missing_layout(slides, tmp_path):
    with pytest.raises(FileNotFoundError, match="training/tumor/tumor_\\*.tif"):
        build_dataset("camelyon16", root=tmp_path / "nowhere")
    root = tmp_path / "c16"
    (root / "training" / "tumor").mkdir(parents=True)
    (root / "training" / "tumor" / "tumor_001.tif").symlink_to(slides["tumour"]["slide"])
    with pytest.raises(FileNotFoundError, match=r"tumor_001\.tif: tumour slide without lesion annotations: "
                                                 r"tumor_001\.xml not found in \S*c16/lesion_annotations"):
        build_dataset("camelyon16", root=root)
    (root / "lesion_annotations").mkdir()
    (root / "lesion_annotations" / "tumor_001.xml").symlink_to(slides["tumour"]["xml"])
    ds = build_dataset("camelyon16", root=root, level=1, tile_size=64, transforms=None)
    assert ds.classes == ("background", "tumour") and sum(t["tumour"] > 0 for t in ds.tiles) > 0


@pytest.mark.skipif(not SVS.is_file(), reason="../shared/data/wsi/CMU-1-Small-Region.svs not available")
def test_real_aperio_slide_tissue_mask_and_own_annotation(tmp_path):
    mask, ds = tissue_mask(SVS)
    assert mask.shape == (92, 69) and ds == pytest.approx(2220 / 69)
    assert mask[:, :10].mean() < 0.02 and mask[:, -10:].mean() < 0.02   # glass margins left and right
    assert mask[:, 29:37].mean() > 0.85                                # the central band of tissue
    # a lesion drawn over the tissue (level-0 pixels): the tiles inside it are all tumour, the others none
    box = np.array([[1024.0, 768], [1536, 768], [1536, 1280], [1024, 1280]])
    xml = write_asap_xml(tmp_path / "CMU-1-Small-Region.xml", [Annotation("lesion", "_0", "polygon", box)])
    ds = CamelyonTiles([SVS], {"CMU-1-Small-Region": xml}, level=0, tile_size=256, min_tissue=0.5)
    tiles = {(t["x"], t["y"]): t for t in ds.tiles}
    assert {(1024, 768), (1280, 1024)} <= set(tiles) and len(ds) > 20
    for (x, y), t in tiles.items():
        inside = 1024 <= x < 1536 and 768 <= y < 1280
        assert t["tumour"] == (1.0 if inside else 0.0) and t["label"] == int(inside)
    i = list(tiles).index((1280, 1024))
    image, target = ds[i]
    assert image.shape == (3, 256, 256) and bool((target == 1).all())
    outside = write_asap_xml(tmp_path / "outside.xml", [Annotation("big", "_0", "polygon", box * 2)])
    with pytest.raises(ValueError, match=r"outside\.xml: annotation 'big'.*level 0 is 2220 x 2967"):
        CamelyonTiles([SVS], [outside], level=0, tile_size=256)
