"""timm's image augmentations inside the seeded classification pipeline: AutoAugment / RandAugment / AugMix and
random erasing (:mod:`timm.data.auto_augment`, :class:`timm.data.RandomErasing`, not rewritten).

timm's ops draw from the *global* generators (python's ``random``, numpy's, torch's for erasing noise). Each
call here runs them inside :func:`seeded_global_rngs`, with a seed drawn from the pipeline's own seeded stream, and
restores the global generators after, so the augmentations follow
:class:`~pce.datasets.transforms.ClassificationTransform`'s seeding (the same seed gives the same images, in any
process) and never move the trainer's random streams.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Sequence

import albumentations as A
import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing

__all__ = ["TimmAutoAugment", "build_random_erasing", "seeded_global_rngs", "ERASING_DEFAULTS"]

#: the options of :class:`timm.data.RandomErasing` a config may set (``random_erasing`` of the transform)
ERASING_DEFAULTS: Dict[str, Any] = {"probability": 0.25, "mode": "pixel", "min_area": 0.02, "max_area": 1 / 3,
                                    "min_aspect": 0.3, "max_aspect": None, "min_count": 1, "max_count": None}


@contextmanager
def seeded_global_rngs(seed: int, torch_gen: Optional[torch.Generator] = None) -> Iterator[None]:
    """Python's ``random`` and numpy's global generator seeded with ``seed`` inside the block, and torch's CPU
    generator in the state of ``torch_gen`` (its advanced state is kept in ``torch_gen``); the global generators get
    their previous states back after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = None if torch_gen is None else torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_gen is not None:
        torch.set_rng_state(torch_gen.get_state())
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if torch_gen is not None:
            torch_gen.set_state(torch.get_rng_state())
            torch.set_rng_state(torch_state)


def _timm_op(config: str, img_size: int, fill: Sequence[int]) -> Any:
    """timm's transform for an ``auto_augment`` string, with the hyper-parameters ``timm.data.create_transform``
    gives it (``translate_const`` 45% of the side, ``img_mean`` the fill of rotations / shears / translations)."""
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(int(v) for v in fill))
    if config.startswith("rand"):
        return rand_augment_transform(config, hparams)
    if config.startswith("augmix"):
        return augment_and_mix_transform(config, dict(hparams, translate_pct=0.3))
    return auto_augment_transform(config, hparams)


class TimmAutoAugment(A.ImageOnlyTransform):
    """timm's ``auto_augment`` policy (``"rand-m9-mstd0.5"``, ``"rand-n1-m10-mstd101-p1"`` (TrivialAugment-style:
    one op, uniform magnitude), ``"original"``, ``"v0"``, ``"augmix-m5-w4-d2"``, ...) as an albumentations step.

    HWC float images in [0, 1] with 1 or 3 channels: quantised to 8 bits (timm's ops are PIL ops), a 1-channel
    image goes through the op as a gray RGB image (``fill`` gray too, so it stays gray) and comes back as ``L``.
    ``fill``: the fill colour in [0, 1] (one value, or one per channel; timm uses the dataset mean).
    """

    def __init__(self, config: str, img_size: int = 224, fill: Sequence[float] = (0.5,), p: float = 1.0) -> None:
        super().__init__(p=p)
        if not isinstance(config, str) or not config:
            raise ValueError(f"auto_augment must be a timm auto-augment string (e.g. 'rand-m9-mstd0.5'), "
                             f"got {config!r}")
        rgb = [min(255, round(255 * float(v))) for v in fill]
        rgb = rgb * 3 if len(rgb) == 1 else rgb
        try:
            self.op = _timm_op(config, int(img_size), rgb[:3])
        except (AssertionError, ValueError, KeyError) as e:
            raise ValueError(f"auto_augment: {config!r} is not a timm auto-augment config ({e or 'refused by timm'}; "
                             "e.g. 'rand-m9-mstd0.5', 'rand-n1-m10-mstd101-p1', 'original', 'v0', "
                             "'augmix-m5-w4-d2')") from None
        self.config, self.img_size, self.fill = config, int(img_size), tuple(float(v) for v in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        return {"op_seed": self.py_random.randrange(2**32)}  # from the stream Compose(seed=...) seeds

    def apply(self, img: np.ndarray, op_seed: int = 0, **params: Any) -> np.ndarray:
        gray = img.ndim == 2 or img.shape[-1] == 1
        if not gray and img.shape[-1] != 3:
            raise ValueError(f"auto_augment: timm's ops take 1- or 3-channel images, got {img.shape[-1]} channels")
        u8 = np.clip(np.rint(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)
        pil = Image.fromarray(u8.reshape(u8.shape[:2]), "L").convert("RGB") if gray else Image.fromarray(u8, "RGB")
        with seeded_global_rngs(op_seed):
            out = self.op(pil)
        arr = np.asarray(out.convert("L") if gray else out.convert("RGB"), dtype=np.float32) / 255.0
        return arr.reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("config", "img_size", "fill")


def build_random_erasing(options: Dict[str, Any]) -> RandomErasing:
    """:class:`timm.data.RandomErasing` (on the CPU) of ``options`` (keys of :data:`ERASING_DEFAULTS`; ValueError
    naming an unknown key or a mode timm refuses)."""
    unknown = set(options) - set(ERASING_DEFAULTS)
    if unknown:
        raise ValueError(f"random_erasing: unknown option(s) {sorted(unknown)}; allowed: {sorted(ERASING_DEFAULTS)}")
    opts = {**ERASING_DEFAULTS, **options}
    if str(opts["mode"]).lower() not in ("const", "rand", "pixel"):
        raise ValueError(f"random_erasing: mode {opts['mode']!r} (one of 'const', 'rand', 'pixel')")
    return RandomErasing(device="cpu", **opts)
