"""Classification augmentation on albumentations 2.x.

``ClassificationTransform`` maps a float tensor [C, H, W] in [0, 1] (what the dataset adapters
produce) to a normalised float32 tensor [C, H', W'].

Train pipeline, in order (each step only if configured):
resize (``Resize``, or ``RandomResizedCrop`` when ``scale`` is given) -> pad-and-crop translation
(``PadIfNeeded`` with 0 + ``RandomCrop``) -> ``HorizontalFlip`` -> channel shift (``RaiseOneChannel``)
-> timm's ``auto_augment`` policy (RandAugment / AutoAugment / AugMix, :mod:`.timm_augment`) -> channel shift
(``RaiseOneChannel``) -> black patches (``CoarseDropout`` with fill 0, so holes are black *before* normalisation)
-> ``(x - mean) / std`` -> timm's ``RandomErasing`` (on the normalised image, as in timm). Eval: resize ->
normalise (deterministic).
"""

from __future__ import annotations

import os
import random
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .registry import TRANSFORMS  # noqa: E402
from .timm_augment import TimmAutoAugment, build_random_erasing, seeded_global_rngs  # noqa: E402

__all__ = ["ClassificationTransform", "RaiseOneChannel"]


class RaiseOneChannel(A.ImageOnlyTransform):
    """Raise one randomly chosen channel by ``U(shift_range)`` and clip ("alzando uno dei canali RGB").

    Works on HWC float images in [0, 1] (shift in the same units) or uint8 (shift * 255).
    Single-channel images are returned unchanged (a no-op, so one config can serve gray and RGB
    datasets). With C > 1 channels any one of the C channels is picked uniformly.
    """

    def __init__(self, shift_range: tuple[float, float] = (0.1, 0.3), p: float = 0.5) -> None:
        super().__init__(p=p)
        lo, hi = (float(v) for v in shift_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"RaiseOneChannel: shift_range must satisfy 0 <= lo <= hi <= 1, got {shift_range!r}")
        self.shift_range = (lo, hi)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = params["shape"]
        if len(shape) == 2 or shape[-1] == 1:
            return {"channel": None, "shift": 0.0}
        return {"channel": self.py_random.randrange(shape[-1]), "shift": self.py_random.uniform(*self.shift_range)}

    def apply(self, img: np.ndarray, channel: int | None = None, shift: float = 0.0, **params: Any) -> np.ndarray:
        if channel is None or img.ndim == 2:
            return img
        out = img.copy()
        if img.dtype == np.uint8:
            out[..., channel] = np.clip(out[..., channel].astype(np.int32) + round(shift * 255), 0, 255)
        else:
            out[..., channel] = np.clip(out[..., channel] + shift, 0.0, 1.0)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("shift_range",)


_BLACK_PATCH_DEFAULTS = {"num_holes_range": (1, 3), "hole_height_range": (0.1, 0.25), "hole_width_range": (0.1, 0.25), "p": 0.5}
_CHANNEL_SHIFT_DEFAULTS = {"shift_range": (0.1, 0.3), "p": 0.5}


def _options(given: dict | None, defaults: dict, what: str) -> dict:
    """Merge ``given`` over ``defaults``; unknown keys (e.g. albumentations 1.x names) raise ValueError."""
    opts = dict(defaults)
    unknown = set(given or {}) - set(defaults)
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {sorted(unknown)}; allowed: {sorted(defaults)}")
    opts.update(given or {})
    return opts


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"ClassificationTransform: size must be a positive int or (h, w), got {size!r}")
    return int(h), int(w)


@TRANSFORMS.register("classification")
class ClassificationTransform:
    """Callable: float tensor [C, H, W] in [0, 1] -> normalised float32 tensor [C, H', W'].

    Args:
        train: random augmentation on (train) or off (eval: resize + normalise only).
        size: output size (int or (h, w)); None keeps the input size.
        mean, std: per-channel statistics (length 1 broadcasts, else length C); output is (x - mean) / std.
        hflip: random horizontal flip (p=0.5) in train mode.
        pad_crop: train-time zero-pad by this many pixels per side then random crop back (random translation).
        black_patches: None (off) or CoarseDropout options with fill 0: ``num_holes_range``,
            ``hole_height_range``, ``hole_width_range`` (ints = pixels, floats = fraction of the side), ``p``.
        channel_shift: None (off) or ``{"shift_range": (lo, hi), "p": p}``: raise one random channel by
            U(lo, hi) (values in [0, 1] units, clipped); no-op on 1-channel images.
        scale: with ``size`` and ``train``, use RandomResizedCrop(size, scale=scale) instead of Resize.
        auto_augment: None (off) or a timm auto-augment string applied after the flip: ``"rand-m9-mstd0.5"``
            (RandAugment), ``"rand-n1-m10-mstd101-p1"`` (TrivialAugment-style), ``"original"`` / ``"v0"``
            (AutoAugment), ``"augmix-m5-w4-d2"``; 1- or 3-channel images (fill: ``mean``).
        random_erasing: None (off) or options of timm's ``RandomErasing`` (``probability``, ``mode``
            ``"const"`` / ``"rand"`` / ``"pixel"``, ``min_area``, ``max_area``, ``min_aspect``, ``max_aspect``,
            ``min_count``, ``max_count``), applied to the normalised image in train mode.
        seed: seed of the augmentation stream. In a DataLoader worker the stream is re-seeded from the
            worker's torch seed (+ ``seed``), so workers never repeat each other's augmentations.
    """

    def __init__(
        self,
        train: bool = False,
        size: int | Sequence[int] | None = None,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        hflip: bool = False,
        pad_crop: int = 0,
        black_patches: dict | None = None,
        channel_shift: dict | None = None,
        scale: tuple[float, float] | None = None,
        seed: int | None = None,
        auto_augment: str | None = None,
        random_erasing: dict | None = None,
    ) -> None:
        self.train = bool(train)
        self.size = _pair(size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.mean.numel() == 0 or self.std.numel() == 0:
            raise ValueError("ClassificationTransform: mean and std must not be empty")
        if bool((self.std <= 0).any()):
            raise ValueError(f"ClassificationTransform: std must be > 0, got {self.std.tolist()}")
        if int(pad_crop) != pad_crop or pad_crop < 0:
            raise ValueError(f"ClassificationTransform: pad_crop must be an int >= 0, got {pad_crop!r}")
        self.hflip = bool(hflip)
        self.pad_crop = int(pad_crop)
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        if self.scale is not None and self.size is None:
            raise ValueError("ClassificationTransform: scale (RandomResizedCrop) needs size")
        self.black_patches = None if black_patches is None else _options(black_patches, _BLACK_PATCH_DEFAULTS, "black_patches")
        self.channel_shift = None if channel_shift is None else _options(channel_shift, _CHANNEL_SHIFT_DEFAULTS, "channel_shift")
        self.seed = seed
        self.auto_augment = auto_augment or None
        self.random_erasing = None if random_erasing is None else dict(random_erasing)
        self._erasing = None if random_erasing is None else build_random_erasing(self.random_erasing)
        self._erase_rngs: tuple[random.Random, torch.Generator] | None = None
        self._pipelines: dict[tuple[int, int], A.Compose] = {}
        self._pid = os.getpid()
        # Build once now so bad albumentations options fail at construction, not in a worker.
        self._pipeline(self.size or (32, 32))
        self._pipelines.clear()

    # --- pipeline -------------------------------------------------------------------------------
    def _stream_seed(self) -> int | None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.seed
        return (info.seed + (self.seed or 0)) % (2**32)

    def _steps(self, h: int, w: int) -> list[A.BasicTransform]:
        steps: list[A.BasicTransform] = []
        out_h, out_w = self.size or (h, w)
        if self.train and self.scale is not None:
            steps.append(A.RandomResizedCrop(size=(out_h, out_w), scale=self.scale, p=1.0))
        elif (out_h, out_w) != (h, w):
            steps.append(A.Resize(out_h, out_w, interpolation=cv2.INTER_LINEAR, p=1.0))
        if not self.train:
            return steps
        if self.pad_crop:
            p = self.pad_crop
            steps.append(A.PadIfNeeded(min_height=out_h + 2 * p, min_width=out_w + 2 * p,
                                       border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
            steps.append(A.RandomCrop(height=out_h, width=out_w, p=1.0))
        if self.hflip:
            steps.append(A.HorizontalFlip(p=0.5))
        if self.auto_augment:
            steps.append(TimmAutoAugment(self.auto_augment, min(out_h, out_w), self.mean.tolist()))
        if self.channel_shift is not None:
            steps.append(RaiseOneChannel(**self.channel_shift))
        if self.black_patches is not None:
            steps.append(A.CoarseDropout(fill=0, **self.black_patches))
        return steps

    def _pipeline(self, hw: tuple[int, int]) -> A.Compose:
        pid = os.getpid()
        if pid != self._pid:  # first call in a DataLoader worker: fresh, worker-specific streams
            self._pid = pid
            self._pipelines.clear()
            self._erase_rngs = None
        pipe = self._pipelines.get(hw)
        if pipe is None:
            pipe = A.Compose(self._steps(*hw), seed=self._stream_seed())
            self._pipelines[hw] = pipe
        return pipe

    # --- call -----------------------------------------------------------------------------------
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Float tensor [C, H, W] in [0, 1] -> normalised float32 tensor [C, H', W']."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or not image.is_floating_point():
            got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
            raise ValueError(f"ClassificationTransform: expected a float tensor [C, H, W] in [0, 1], got {got}")
        c, h, w = image.shape
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t.numel() not in (1, c):
                raise ValueError(f"ClassificationTransform: {name} has {t.numel()} values for a {c}-channel image")
        pipe = self._pipeline((h, w))
        if pipe.transforms:
            arr = np.ascontiguousarray(image.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy())
            out = pipe(image=arr)["image"]
            if out.ndim == 2:
                out = out[:, :, None]
            x = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).permute(2, 0, 1)
        else:
            x = image.detach().to("cpu", torch.float32)
        x = ((x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)).contiguous()
        return self._erase(x) if (self.train and self._erasing is not None) else x

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        """timm's RandomErasing of the normalised ``x [C, H, W]`` (in place), seeded from this transform's stream."""
        if self._erase_rngs is None:
            stream = random.Random(self._stream_seed())
            self._erase_rngs = (stream, torch.Generator().manual_seed(stream.randrange(2**63)))
        stream, gen = self._erase_rngs
        with seeded_global_rngs(stream.randrange(2**32), gen):
            self._erasing(x)
        return x

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pipelines"] = {}
        state["_erase_rngs"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"ClassificationTransform(train={self.train}, size={self.size}, mean={self.mean.tolist()}, "
            f"std={self.std.tolist()}, hflip={self.hflip}, pad_crop={self.pad_crop}, "
            f"black_patches={self.black_patches}, channel_shift={self.channel_shift}, scale={self.scale}, "
            f"auto_augment={self.auto_augment!r}, random_erasing={self.random_erasing})"
        )
