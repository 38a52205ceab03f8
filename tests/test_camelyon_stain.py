"""Stain handling of the ``camelyon_tile`` transform: Macenko / Reinhard normalisation against torchstain called
directly, H and E kept in their places (nuclei stay purple), Reinhard's target reached (measured with
scikit-image's L*a*b*), the default Reinhard target re-measured on CMU-1, HED augmentation against scikit-image
called directly and within its bounds, determinism (seed, DataLoader workers), eval never augments, glass and
degenerate tiles without NaN, bad options, and the new libraries imported only when used."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

torchstain = pytest.importorskip("torchstain")
skcolor = pytest.importorskip("skimage.color")

from pce.datasets import build_transform  # noqa: E402
from pce.datasets.camelyon.transforms import REINHARD_REFERENCE, StainNormalizer, TileTransform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the transform's output is the tile itself
OD_PER_HED_UNIT = np.log(1e6)  # skimage's rgb2hed = optical density (natural log) / ln(10^6)

# stain optical-density vectors (R, G, B) of the synthetic tile: Ruifrok's haematoxylin, an eosin with some red and
# blue absorption (as real eosin has), both unlike Macenko's reference, so normalisation has work to do
H_VEC = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_VEC = np.array([0.25, 0.85, 0.46]) / np.linalg.norm([0.25, 0.85, 0.46])


def he_tile(size: int = 128, seed: int = 0, noise: float = 2.0):
    """A uint8 H&E-like tile by Beer-Lambert (``240 exp(-OD)``, Macenko's light): eosin everywhere but a glass
    corner, 25 round nuclei of haematoxylin; returns ``(tile, nuclei, eosin-only, glass)`` masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nuclei = np.zeros((size, size), bool)
    for cy, cx in rng.integers(8, size - 8, (25, 2)):
        nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 36)
    glass = yy + xx < size // 3
    ce = np.where(glass, 0.0, rng.gamma(4, 0.2, (size, size)))
    ch = np.where(nuclei & ~glass, rng.normal(1.5, 0.3, (size, size)).clip(0.3), 0.0)
    od = ch[..., None] * H_VEC + ce[..., None] * E_VEC
    tile = np.clip(240 * np.exp(-od) + rng.normal(0, noise, od.shape), 0, 255).round().astype(np.uint8)
    return tile, nuclei & ~glass, ~nuclei & ~glass, glass


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """As CamelyonTiles makes a tile: float32 [3, h, w] = uint8 / 255."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return image.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------ normalisation
def test_macenko_equals_torchstain_and_keeps_nuclei_haematoxylin():
    tile, nuclei, eosin, glass = he_tile()
    out = to_uint8(build_transform("camelyon_tile", stain_norm="macenko", **IDENTITY)(to_tensor(tile)))
    ref = torchstain.normalizers.MacenkoNormalizer(backend="numpy").normalize(tile, stains=False)[0]
    np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - tile).mean() > 5  # it did something
    # H onto the reference's H: nuclei purple (blue above red), eosin pink (red above blue), glass stays glass
    # (MONAI 1.6's NormalizeHEStains swaps them: nuclei come out with red above blue)
    nuc, eos = out[nuclei].mean(0), out[eosin].mean(0)
    assert nuc[2] > nuc[0] + 5 and eos[0] > eos[2] + 10 and nuc[0] < eos[0] - 60
    assert np.abs(out[glass].mean(0) - 240).max() < 2


def test_macenko_reference_dict_and_reference_tile(tmp_path):
    from PIL import Image

    tile, *_ = he_tile(seed=1)
    ref_tile, *_ = he_tile(seed=2, noise=0.5)
    he = [[0.60, 0.20], [0.75, 0.85], [0.28, 0.48]]
    out = to_uint8(build_transform("camelyon_tile", stain_norm="macenko", stain_ref=dict(he=he, max_conc=(1.5, 0.9)),
                                   **IDENTITY)(to_tensor(tile)))
    direct = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    direct.HERef, direct.maxCRef = np.array(he), np.array([1.5, 0.9])
    np.testing.assert_array_equal(out, direct.normalize(tile, stains=False)[0])

    Image.fromarray(ref_tile).save(tmp_path / "ref.png")
    t = build_transform("camelyon_tile", stain_norm="macenko", stain_ref=str(tmp_path / "ref.png"), **IDENTITY)
    fitted = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    fitted.fit(ref_tile)
    np.testing.assert_allclose(t.stain_norm.reference["he"], fitted.HERef)
    np.testing.assert_array_equal(to_uint8(t(to_tensor(tile))), fitted.normalize(tile, stains=False)[0])
    # normalising the reference tile onto itself changes little
    assert np.abs(to_uint8(t(to_tensor(ref_tile))).astype(int) - ref_tile).mean() < 3


def test_reinhard_equals_torchstain_and_reaches_the_target(tmp_path):
    from PIL import Image

    tile, *_ = he_tile(seed=3)
    out = to_uint8(build_transform("camelyon_tile", stain_norm="reinhard", **IDENTITY)(to_tensor(tile)))
    direct = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    direct.target_means = np.array(REINHARD_REFERENCE["mean"], np.float32)
    direct.target_stds = np.array(REINHARD_REFERENCE["std"], np.float32)
    np.testing.assert_array_equal(out, direct.normalize(tile))
    # an independent measure: scikit-image's CIE L*a*b* of the output has the target's statistics
    lab = skcolor.rgb2lab(out).reshape(-1, 3)
    # (the default target's spread pushes ~7% of the pixels out of the RGB gamut, clipped: stds a little lower)
    np.testing.assert_allclose(lab.mean(0), REINHARD_REFERENCE["mean"], atol=1.0)
    np.testing.assert_allclose(lab.std(0), REINHARD_REFERENCE["std"], rtol=0.2)
    before = skcolor.rgb2lab(tile).reshape(-1, 3)
    assert np.abs(before.mean(0) - REINHARD_REFERENCE["mean"]).max() > 5  # not there before

    target = dict(mean=(70.0, 20.0, -5.0), std=(12.0, 8.0, 6.0))
    out2 = to_uint8(build_transform("camelyon_tile", stain_norm="reinhard", stain_ref=target, **IDENTITY)(
        to_tensor(tile)))
    lab2 = skcolor.rgb2lab(out2).reshape(-1, 3)
    np.testing.assert_allclose(lab2.mean(0), target["mean"], atol=0.5)  # within the gamut: exact up to rounding
    np.testing.assert_allclose(lab2.std(0), target["std"], rtol=0.03)

    ref_tile, *_ = he_tile(seed=4)
    Image.fromarray(ref_tile).save(tmp_path / "ref.png")
    t = build_transform("camelyon_tile", stain_norm="reinhard", stain_ref=tmp_path / "ref.png", **IDENTITY)
    fitted = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    fitted.fit(ref_tile)
    np.testing.assert_array_equal(to_uint8(t(to_tensor(tile))), fitted.normalize(tile))


@pytest.mark.skipif(not SVS.is_file(), reason=f"{SVS} not available")
def test_default_reinhard_reference_is_cmu1s_statistics():
    """REINHARD_REFERENCE = pooled L*a*b* statistics of CMU-1-Small-Region's 256 px tiles with >= 50% stained
    pixels (how it was measured, redone)."""
    import openslide

    from pce.datasets.camelyon.transforms import stained_fraction

    with openslide.OpenSlide(str(SVS)) as s:
        im = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    tiles = [im[y:y + 256, x:x + 256] for y in range(0, im.shape[0] - 255, 256)
             for x in range(0, im.shape[1] - 255, 256)]
    kept = [t.reshape(-1, 1, 3) for t in tiles if stained_fraction(t) >= 0.5]
    assert len(kept) == 26
    fit = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    fit.fit(np.concatenate(kept))
    np.testing.assert_allclose(fit.target_means, REINHARD_REFERENCE["mean"], atol=0.006)
    np.testing.assert_allclose(fit.target_stds, REINHARD_REFERENCE["std"], atol=0.006)


# ------------------------------------------------------------------------------------------------ HED augmentation
def hed_tile(size: int = 64, seed: int = 0) -> np.ndarray:
    """float32 RGB made by scikit-image's hed2rgb from H, E, D concentrations of 0.1-1.2 optical density (none
    near 0, so a shift of at most 0.05 keeps them positive and nothing is clipped)."""
    rng = np.random.default_rng(seed)
    od = np.stack([rng.uniform(0.1, 1.2, (size, size)), rng.uniform(0.1, 0.9, (size, size)),
                   rng.uniform(0.1, 0.3, (size, size))], -1)
    return skcolor.hed2rgb(od / OD_PER_HED_UNIT).astype(np.float32)


def aug(s: float, seed: int, **kw) -> TileTransform:
    return build_transform("camelyon_tile", train=True, dihedral=False, jitter=None, stain_aug=s, seed=seed,
                           **{**IDENTITY, **kw})


def test_hed_augmentation_equals_skimage_with_the_seeded_draws_and_moves_within_bounds():
    x = hed_tile()
    out = aug(0.05, seed=3)(torch.from_numpy(x).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    g = np.random.default_rng(3)  # the transform's stream: scales, then shifts (dihedral and jitter off)
    scale, shift = g.uniform(0.95, 1.05, 3), g.uniform(-0.05, 0.05, 3)
    expected = skcolor.hed2rgb(skcolor.rgb2hed(x) * scale + shift / OD_PER_HED_UNIT)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    assert np.abs(out - x).mean() > 1e-3
    # the concentrations moved by c -> a c + b: recovered per channel by a line fit, within the bounds
    c_in = skcolor.rgb2hed(x.astype(np.float64)).reshape(-1, 3) * OD_PER_HED_UNIT
    c_out = skcolor.rgb2hed(out.astype(np.float64)).reshape(-1, 3) * OD_PER_HED_UNIT
    for ch in range(3):
        a, b = np.polyfit(c_in[:, ch], c_out[:, ch], 1)
        assert a == pytest.approx(scale[ch], abs=1e-3) and b == pytest.approx(shift[ch], abs=1e-3)


def test_hed_augmentation_bounds_over_many_draws_and_determinism():
    x = hed_tile(size=24, seed=1)
    c_in = skcolor.rgb2hed(x.astype(np.float64)).reshape(-1, 3) * OD_PER_HED_UNIT
    xt = torch.from_numpy(x).permute(2, 0, 1)
    t = aug(0.1, seed=5)
    fits = []
    for _ in range(40):
        c_out = skcolor.rgb2hed(t(xt).permute(1, 2, 0).numpy().astype(np.float64)).reshape(-1, 3) * OD_PER_HED_UNIT
        ok = (c_in > 0.15).all(1) & (c_out > 1e-3).all(1)  # no clipped pixel (a shift of -0.1 can reach 0)
        fits.append([np.polyfit(c_in[ok, ch], c_out[ok, ch], 1) for ch in range(3)])
    fits = np.array(fits)  # [draw, channel, (a, b)]
    assert (np.abs(fits[..., 0] - 1) <= 0.1 + 1e-3).all() and (np.abs(fits[..., 1]) <= 0.1 + 1e-3).all()
    assert fits[..., 0].std() > 0.03 and fits[..., 1].std() > 0.03  # they do vary over the range
    # same seed, same sequence (an epoch-seeded rebuild replays it: exact resume); another seed differs
    a, b, c = aug(0.1, seed=9), aug(0.1, seed=9), aug(0.1, seed=10)
    for _ in range(3):
        ya, yb, yc = a(xt), b(xt), c(xt)
        assert torch.equal(ya, yb) and not torch.equal(ya, yc)


def test_strength_zero_is_identity_and_leaves_the_stream_alone():
    tile, *_ = he_tile(size=64, seed=5)
    x = to_tensor(tile)
    assert torch.equal(aug(0.0, seed=1)(x), x)
    m = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (64, 64)))
    base = build_transform("camelyon_tile", train=True, jitter=(0.1, 0.1), seed=4)
    zero = build_transform("camelyon_tile", train=True, jitter=(0.1, 0.1), seed=4, stain_aug=0.0)
    for _ in range(4):
        (ia, ma), (ib, mb) = base(x, m), zero(x, m)
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
    assert base._rng.bit_generator.state == zero._rng.bit_generator.state
    g = np.random.default_rng(4)  # and that stream is the pre-stain one: per tile k, flip, brightness, saturation
    for _ in range(4):
        g.integers(4), g.integers(2), g.uniform(0.9, 1.1), g.uniform(0.9, 1.1)
    assert zero._rng.bit_generator.state == g.bit_generator.state
    # with stain_aug on, the geometric draw still comes first: same symmetry, the mask is unchanged
    on = build_transform("camelyon_tile", train=True, jitter=(0.1, 0.1), seed=4, stain_aug=0.05)
    base = build_transform("camelyon_tile", train=True, jitter=(0.1, 0.1), seed=4)
    (ia, ma), (ib, mb) = base(x, m), on(x, m)
    assert torch.equal(ma, mb) and not torch.equal(ia, ib)


def test_eval_never_augments():
    tile, *_ = he_tile(size=64, seed=6)
    x = to_tensor(tile)
    for norm in (None, "macenko"):
        plain = build_transform("camelyon_tile", train=False, stain_norm=norm, **IDENTITY)
        ev = build_transform("camelyon_tile", train=False, stain_norm=norm, stain_aug=0.5, jitter=(0.5, 0.5),
                             seed=1, **IDENTITY)
        state = ev._rng.bit_generator.state
        for _ in range(3):
            assert torch.equal(ev(x), plain(x))
        assert ev._rng.bit_generator.state == state  # nothing drawn
    assert torch.equal(plain(x), to_tensor(to_uint8(plain(x))))  # eval still normalises the stain (Macenko)
    assert not torch.equal(plain(x), x)


class _Tiles(Dataset):
    def __init__(self, transform):
        self.x, self.transform = torch.from_numpy(hed_tile(size=16, seed=2)).permute(2, 0, 1), transform

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.x)


def test_dataloader_workers_draw_their_own_reproducible_streams():
    def run():
        loader = DataLoader(_Tiles(aug(0.2, seed=7)), batch_size=1, num_workers=2,
                            generator=torch.Generator().manual_seed(11))
        return torch.cat(list(loader))

    a, b = run(), run()
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # the two workers (items 0 and 1) do not repeat each other


# ----------------------------------------------------------------------------------------- glass and degeneracy
def blank_tiles():
    rng = np.random.default_rng(0)
    one = np.full((64, 64, 3), 250, np.uint8)
    one[5, 7] = (90, 40, 120)
    return {
        "white": np.full((64, 64, 3), 255, np.uint8),
        "glass": rng.integers(225, 251, (64, 64, 3)).astype(np.uint8),
        "one stained pixel": one,
        "flat purple": np.full((64, 64, 3), (120, 60, 140), np.uint8),
        "black": np.zeros((64, 64, 3), np.uint8),
    }


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_glass_and_degenerate_tiles_fall_back_without_nan(method):
    t = build_transform("camelyon_tile", stain_norm=method, train=True, stain_aug=0.2, seed=0)
    kept = build_transform("camelyon_tile", stain_norm=None, train=True, stain_aug=0.2, seed=0)
    for name, rgb in blank_tiles().items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "camelyon_tile: .* skipped", RuntimeWarning)  # counted: next test
            y = t(to_tensor(rgb))
        assert torch.isfinite(y).all(), name
        assert torch.equal(y, kept(to_tensor(rgb))), name  # kept as it was, then augmented alike
    assert t.stain_fallbacks == 5
    # the library's own failure modes (empty / 1-pixel statistics, zero spread), reached by lifting the checks
    sn = StainNormalizer(method, min_stained=0.0, min_second_stain=0.0)
    for name in ("white", "glass", "one stained pixel") if method == "macenko" else ("white", "flat purple"):
        out, why = sn(blank_tiles()[name])
        assert out is None and "degenerate" in why, (name, why)


def test_fallbacks_are_counted_with_log_spaced_warnings():
    t = build_transform("camelyon_tile", stain_norm="macenko", **IDENTITY)
    white = torch.ones(3, 32, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(12):
            assert torch.equal(t(white), white)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert t.stain_fallbacks == 12 and len(msgs) == 2, msgs
    assert "on 1 tile(s)" in msgs[0] and "on 10 tile(s)" in msgs[1] and "glass" in msgs[1]
    # a tile of a single colour direction (one stain at varying density) is degenerate for Macenko
    tile, *_ = he_tile(size=64, seed=7)
    od = -np.log((tile.astype(float) + 1) / 240)
    eosin_only = np.clip(240 * np.exp(-np.outer(np.linalg.norm(od, axis=-1), E_VEC)), 0, 255).astype(np.uint8)
    out, why = t.stain_norm(eosin_only.reshape(64, 64, 3))
    assert out is None and "single colour direction" in why


def test_bad_options(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="stain_norm must be"):
        TileTransform(stain_norm="vahadane")
    with pytest.raises(ValueError, match="stain_norm is None"):
        TileTransform(stain_ref=dict(mean=(1, 2, 3), std=(1, 1, 1)))
    with pytest.raises(ValueError, match="stain_aug"):
        TileTransform(stain_aug=-0.1)
    with pytest.raises(ValueError, match="keys"):
        TileTransform(stain_norm="macenko", stain_ref=dict(mean=(1, 2, 3), std=(1, 1, 1)))
    with pytest.raises(ValueError, match="max_conc"):
        TileTransform(stain_norm="macenko", stain_ref=dict(he=np.eye(3, 2) + 0.1, max_conc=(1.0, -1.0)))
    with pytest.raises(ValueError, match="std"):
        TileTransform(stain_norm="reinhard", stain_ref=dict(mean=(1, 2, 3), std=(1, 0, 1)))
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(ValueError, match="stained"):
        TileTransform(stain_norm="reinhard", stain_ref=tmp_path / "glass.png")


def test_new_libraries_are_imported_only_when_used():
    code = ("import sys; from pce.datasets import build_transform; import torch; "
            "t = build_transform('camelyon_tile', train=True); t(torch.rand(3, 8, 8)); "
            "print(sorted(m for m in ('torchstain', 'skimage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
