"""Tile augmentation for pathology: the 8 dihedral symmetries (flips and 90-degree rotations: tissue has no
up or left) and light brightness / saturation jitter, then normalisation; optionally stain normalisation (Macenko
or Reinhard, by torchstain) and HED stain augmentation (Tellez et al., by scikit-image's colour deconvolution).

Stain handling needs ``torchstain`` (normalisation) and ``scikit-image`` (augmentation); both are imported only
when the option is used, so the default transform needs neither."""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..registry import TRANSFORMS

__all__ = ["TileTransform", "StainNormalizer", "stained_fraction", "REINHARD_REFERENCE"]

#: Macenko's transmitted light intensity and transparent-pixel optical density threshold (torchstain's defaults;
#: the same as MONAI's and the reference implementations')
_IO, _BETA = 240.0, 0.15
#: scikit-image's ``rgb2hed`` returns optical density (natural log) divided by ln(10^6); HED augmentation works in
#: optical density, like Macenko's concentrations
_OD_PER_HED_UNIT = float(np.log(1e6))
#: the Reinhard target used when no ``stain_ref`` is given: the pooled mean / std in torchstain's CIE L*a*b* units
#: (L 0-100) of the 26 tiles of 256 px with >= 50% stained pixels of OpenSlide's freely distributable H&E test slide
#: CMU-1-Small-Region.svs (0.499 um/px, about Camelyon16's level 1); tests/test_camelyon_stain.py re-measures it
REINHARD_REFERENCE = {"mean": (53.61, 25.07, -11.11), "std": (25.11, 14.41, 10.33)}


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1.0) / _IO)


def stained_fraction(rgb: np.ndarray) -> float:
    """The fraction of pixels of a uint8 RGB image that Macenko's estimate uses (optical density
    ``-ln((I + 1) / 240)`` at least 0.15 in all three channels); glass and pale fat are below it."""
    od = _optical_density(rgb)
    return float(np.all(od >= _BETA, axis=1).mean()) if od.size else 0.0


def _second_stain(rgb: np.ndarray) -> Tuple[float, float]:
    """``(stained fraction, second / first eigenvalue of the stained pixels' optical density covariance)``: the
    ratio is ~0 when they hold a single colour direction (a flat colour, one stain alone), where Macenko's two
    vectors are arbitrary: 4e-5 for a tile of one stain at varying density, >= 0.0037 on the tiles of the
    generated demo slides, >= 0.05 on the H&E tiles of CMU-1."""
    od = _optical_density(rgb)
    stained = od[np.all(od >= _BETA, axis=1)]
    if len(stained) < 3:
        return (len(stained) / max(len(od), 1)), 0.0
    ev = np.linalg.eigvalsh(np.cov(stained.T.astype(np.float64)))
    return len(stained) / len(od), float(ev[1] / ev[2]) if ev[2] > 1e-8 else 0.0


def _vector(value: Any, shape: Tuple[int, ...], what: str, positive: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"stain_ref {what}: expected numbers of shape {shape}, got {value!r}") from e
    if arr.shape != shape or not np.isfinite(arr).all() or (positive and (arr <= 0).any()):
        raise ValueError(f"stain_ref {what}: expected {'positive ' if positive else ''}finite numbers of shape "
                         f"{shape}, got {value!r}")
    return arr


class StainNormalizer:
    """``uint8 RGB [h, w, 3] -> uint8 RGB [h, w, 3]`` stain normalisation by torchstain (numpy backend), or
    ``None`` when the tile gives no usable stain estimate.

    ``method="macenko"`` (Macenko et al. 2009): the tile's H and E optical-density vectors and 99th-percentile
    concentrations are mapped onto the reference's. Default reference: torchstain's, the stain matrix
    ``((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))`` (rows R, G, B; columns H, E) and maximum
    concentrations ``(1.9705, 1.0308)`` of the reference implementations (Macenko's MATLAB code by M. Veta,
    schaugf/HEnorm_python; MONAI's defaults are the same numbers). ``reference=dict(he=[[...], [...], [...]],
    max_conc=(h, e))`` gives another.

    ``method="reinhard"`` (Reinhard et al. 2001): each CIE L*a*b* channel is standardised and given the
    reference's mean and std. Default reference: :data:`REINHARD_REFERENCE`; ``reference=dict(mean=(L, a, b),
    std=(L, a, b))`` gives another (torchstain's units: L in 0-100).

    ``reference`` may also be the path of a reference tile (any image Pillow reads), fitted by torchstain.

    A tile with fewer than ``min_stained`` stained pixels (:func:`stained_fraction`: glass, fat), for Macenko one
    whose stained pixels span a single colour direction (eigenvalue ratio below ``min_second_stain``: a flat
    colour, one stain alone), or whose estimate is degenerate (an empty or zero-spread statistic, a non-finite or
    overflowing result: numpy's floating-point errors and RuntimeWarnings are raised and caught) returns ``None``
    with the reason; :class:`TileTransform` keeps such a tile unnormalised. Never NaN.

    Not MONAI's ``NormalizeHEStains``: in MONAI 1.6 (since Project-MONAI/MONAI#8551) ``ExtractHEStains`` orders the
    estimated vectors by their red / blue optical-density ratio the wrong way round (haematoxylin absorbs red, so
    its ratio is the higher one), returns eosin first, and the normalised tile gets nuclei in the eosin colour and
    stroma in the haematoxylin one (seen on a tile made of scikit-image's H and E vectors).
    """

    def __init__(self, method: str, reference: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
                 min_stained: float = 0.05, min_second_stain: float = 1e-3) -> None:
        try:
            import torchstain
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("stain normalisation needs torchstain: pip install torchstain") from e
        method = str(method).lower()
        if method not in ("macenko", "reinhard"):
            raise ValueError(f"stain_norm must be None, 'macenko' or 'reinhard', got {method!r}")
        self.method, self.min_stained, self.min_second_stain = method, float(min_stained), float(min_second_stain)
        factory = torchstain.normalizers.MacenkoNormalizer if method == "macenko" else \
            torchstain.normalizers.ReinhardNormalizer
        self._norm = factory(backend="numpy")
        if reference is None and method == "reinhard":
            reference = REINHARD_REFERENCE
        if isinstance(reference, (str, os.PathLike)):
            self._fit(reference)
        elif isinstance(reference, Mapping):
            keys = ("he", "max_conc") if method == "macenko" else ("mean", "std")
            if set(reference) != set(keys):
                raise ValueError(f"stain_ref for {method}: a dict with keys {keys}, or the path of a reference tile; "
                                 f"got keys {sorted(reference)}")
            if method == "macenko":
                self._norm.HERef = _vector(reference["he"], (3, 2), "he (rows R, G, B; columns H, E)", positive=True)
                self._norm.maxCRef = _vector(reference["max_conc"], (2,), "max_conc", positive=True)
            else:
                self._norm.target_means = _vector(reference["mean"], (3,), "mean").astype(np.float32)
                self._norm.target_stds = _vector(reference["std"], (3,), "std", positive=True).astype(np.float32)
        elif reference is not None:
            raise TypeError(f"stain_ref: None, a dict or the path of a reference tile, got {type(reference).__name__}")

    def _fit(self, path: Union[str, os.PathLike]) -> None:
        from PIL import Image

        with Image.open(path) as im:
            ref = np.asarray(im.convert("RGB"))
        frac = stained_fraction(ref)
        if frac < self.min_stained:
            raise ValueError(f"stain_ref {os.fspath(path)}: only {frac:.1%} of its pixels are stained (glass?); "
                             f"a reference tile needs at least {self.min_stained:.0%}")
        try:
            with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"), \
                    warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                self._norm.fit(ref)
        except (FloatingPointError, RuntimeWarning, ValueError, IndexError, np.linalg.LinAlgError) as e:
            raise ValueError(f"stain_ref {os.fspath(path)}: no {self.method} stain estimate ({e})") from e
        fitted = (self._norm.HERef, self._norm.maxCRef) if self.method == "macenko" else (
            self._norm.target_means, self._norm.target_stds)
        if not all(np.isfinite(v).all() for v in fitted) or (np.asarray(fitted[1]) <= 0).any():
            raise ValueError(f"stain_ref {os.fspath(path)}: degenerate {self.method} stain estimate {fitted}")

    @property
    def reference(self) -> dict:
        """The reference in use, in the form ``stain_ref`` takes."""
        if self.method == "macenko":
            return {"he": np.asarray(self._norm.HERef).tolist(), "max_conc": np.asarray(self._norm.maxCRef).tolist()}
        return {"mean": np.asarray(self._norm.target_means).tolist(),
                "std": np.asarray(self._norm.target_stds).tolist()}

    def __call__(self, rgb: np.ndarray) -> Tuple[Optional[np.ndarray], str]:
        """``(normalised uint8 [h, w, 3], "")``, or ``(None, why)`` for a tile without a usable estimate."""
        if self.method == "macenko":
            frac, second = _second_stain(rgb)
        else:
            frac, second = stained_fraction(rgb), 1.0
        if frac < self.min_stained:
            return None, f"{frac:.1%} stained pixels (< {self.min_stained:.0%}: glass)"
        if second < self.min_second_stain:
            return None, f"a single colour direction (eigenvalue ratio {second:.2g} < {self.min_second_stain:g})"
        try:  # numpy's floating-point errors and RuntimeWarnings (empty or 1-pixel statistics) raise here
            with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"), \
                    warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                out = (self._norm.normalize(rgb, stains=False)[0] if self.method == "macenko"
                       else self._norm.normalize(rgb))
        except (FloatingPointError, RuntimeWarning, ValueError, IndexError, np.linalg.LinAlgError) as e:
            return None, f"degenerate stain estimate ({type(e).__name__}: {e})"
        return out, ""


@TRANSFORMS.register("camelyon_tile")
class TileTransform:
    """``(image float32 [3, s, s] in [0, 1], mask int64 [s, s] or None)`` -> the same, augmented (train) and
    normalised with ``mean`` / ``std``; called with the image alone it returns the image (classification).

    Train: a random dihedral symmetry (``dihedral``), brightness x U(1 - b, 1 + b) and saturation (distance from
    the grey value) x U(1 - c, 1 + c) with ``jitter=(b, c)``. In a DataLoader worker the stream is re-seeded from
    the worker seed + ``seed``.

    Stain (both off by default):

    * ``stain_norm="macenko"`` or ``"reinhard"``: stain normalisation of every tile, train and eval alike, first
      of all steps (:class:`StainNormalizer`; the tile is quantised to uint8 as read from the slide).
      ``stain_ref``: the reference (``None``: the documented default; a dict; or a reference tile's path).
      A tile with too few stained pixels or a degenerate estimate is kept as it is, and counted
      (``stain_fallbacks``, per transform and process) with a warning at the 1st, 10th, 100th ... such tile.
    * ``stain_aug=s`` (train only): HED augmentation (Tellez et al. 2018): scikit-image's ``rgb2hed`` (Ruifrok
      and Johnston's H, E and DAB vectors), each concentration ``c -> a * c + b`` with ``a ~ U(1 - s, 1 + s)`` and
      ``b ~ U(-s, s)`` optical density (natural log) per channel and tile, then ``hed2rgb``. Drawn from the
      transform's stream after the dihedral symmetry and before the jitter; with ``s = 0`` nothing is drawn, so
      the stream is the one without stain augmentation.
    """

    def __init__(self, train: bool = False, dihedral: bool = True, jitter: Sequence[float] = (0.1, 0.1),
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: Optional[int] = None, stain_norm: Optional[str] = None,
                 stain_ref: Union[None, str, os.PathLike, Mapping[str, Any]] = None, stain_aug: float = 0.0) -> None:
        self.train, self.dihedral = bool(train), bool(dihedral)
        self.jitter = (float(jitter[0]), float(jitter[1])) if jitter else (0.0, 0.0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.seed = 0 if seed is None else int(seed)
        self._rng, self._worker = np.random.default_rng(self.seed), None
        if stain_norm is None and stain_ref is not None:
            raise ValueError("stain_ref is given but stain_norm is None: set stain_norm='macenko' or 'reinhard'")
        self.stain_norm = StainNormalizer(stain_norm, stain_ref) if stain_norm is not None else None
        self.stain_fallbacks = 0
        self.stain_aug = float(stain_aug)
        if not 0.0 <= self.stain_aug < 1.0:
            raise ValueError(f"stain_aug must be in [0, 1), got {stain_aug!r}")
        if self.stain_aug > 0:
            try:
                from skimage.color import hed2rgb, rgb2hed  # noqa: F401  (fail at construction, not in a worker)
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("stain_aug needs scikit-image: pip install scikit-image") from e

    def _gen(self) -> np.random.Generator:
        info = get_worker_info()
        wid = None if info is None else info.id
        if wid != self._worker:
            self._rng, self._worker = np.random.default_rng([info.seed % 2 ** 32, self.seed]), wid
        return self._rng

    def _normalise_stain(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        out, why = self.stain_norm(rgb)
        if out is None:
            self.stain_fallbacks += 1
            n = self.stain_fallbacks
            if str(n).rstrip("0") == "1":  # the 1st, 10th, 100th ...
                warnings.warn(f"camelyon_tile: {self.stain_norm.method} stain normalisation skipped on {n} tile(s) "
                              f"so far in this process (kept unnormalised); latest: {why}", RuntimeWarning,
                              stacklevel=3)
            return image
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float().div_(255.0)

    @staticmethod
    def hed_jitter(image: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
        """``image`` float [3, h, w] in [0, 1] with its H, E, D concentrations ``c -> scale * c + shift``
        (``shift`` in optical density, natural log), by scikit-image's ``rgb2hed`` / ``hed2rgb``."""
        from skimage.color import hed2rgb, rgb2hed

        hed = rgb2hed(image.permute(1, 2, 0).numpy())
        hed = hed * np.asarray(scale, dtype=np.float64) + np.asarray(shift, dtype=np.float64) / _OD_PER_HED_UNIT
        return torch.from_numpy(np.ascontiguousarray(hed2rgb(hed), dtype=np.float32)).permute(2, 0, 1)

    def __call__(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None):
        if self.stain_norm is not None:
            image = self._normalise_stain(image)
        if self.train:
            g = self._gen()
            if self.dihedral:
                k, flip = int(g.integers(4)), bool(g.integers(2))
                image = torch.rot90(image, k, (1, 2))
                mask = torch.rot90(mask, k, (0, 1)) if mask is not None else None
                if flip:
                    image = image.flip(2)
                    mask = mask.flip(1) if mask is not None else None
            s = self.stain_aug
            if s:
                scale, shift = g.uniform(1 - s, 1 + s, 3), g.uniform(-s, s, 3)
                image = self.hed_jitter(image, scale, shift)
            b, c = self.jitter
            if b or c:
                image = image * float(g.uniform(1 - b, 1 + b))
                grey = image.mean(0, keepdim=True)
                image = (grey + (image - grey) * float(g.uniform(1 - c, 1 + c))).clamp_(0, 1)
        image = ((image - self.mean) / self.std).contiguous()
        if mask is None:
            return image
        return image, mask.contiguous()
