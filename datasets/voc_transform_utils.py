"""Shared pieces of the VOC transforms (:mod:`pce.datasets.voc_transforms`, where the registered transforms
live): tensor <-> uint8 image conversion, colour-jitter parsing, per-worker re-seeding, the resize rule and the
box bookkeeping of a crop."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"expected an image tensor of shape [3, H, W], got {getattr(image, 'shape', type(image))}")
    arr = image.detach().cpu().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(1, 2, 0).numpy())


def _uint8_to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def _color_jitter(cj: Any) -> A.BasicTransform | None:
    """None | float s | (brightness, contrast, saturation, hue) | dict -> A.ColorJitter."""
    if cj is None or cj is False:
        return None
    if isinstance(cj, dict):
        kw = dict(cj)
        kw.setdefault("p", 0.8)
        return A.ColorJitter(**kw)
    if isinstance(cj, (int, float)):
        b = c = s = float(cj)
        h = min(float(cj) / 4, 0.5)
    else:
        b, c, s, h = (list(cj) + [0.0] * 4)[:4]
    return A.ColorJitter(
        brightness=(max(0.0, 1 - b), 1 + b), contrast=(max(0.0, 1 - c), 1 + c),
        saturation=(max(0.0, 1 - s), 1 + s), hue=(-h, h), p=0.8,
    )


class _WorkerSeeded:
    """Holds a numpy Generator and albumentations Composes; re-seeds them once per worker process."""

    def _init_rng(self, seed: int | None) -> None:
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._seed_key: tuple[int, int] | None = None

    def _composes(self) -> list[A.Compose]:
        return []

    def _maybe_reseed(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return
        key = (os.getpid(), int(info.seed))
        if key != self._seed_key:
            self._seed_key = key
            s = int(info.seed) % (2**32)
            self._rng = np.random.default_rng([s, 0 if self._seed is None else self._seed])
            for i, comp in enumerate(self._composes()):
                comp.set_random_seed(int(self._rng.integers(0, 2**31 - 1)) + i)


def _base_scale(h: int, w: int, min_size: int | None, max_size: int | None) -> float:
    """Scale factor that brings the shorter side to min_size with the longer side at most max_size."""
    s = 1.0
    if min_size is not None:
        s = min_size / min(h, w)
    if max_size is not None and max(h, w) * s > max_size:
        s = max_size / max(h, w)
    return s


def _resize_masks(masks: np.ndarray | None, new_h: int, new_w: int) -> np.ndarray | None:
    """Object masks ``uint8 [N, H, W]`` resized to ``[N, new_h, new_w]`` (nearest neighbour, so they stay binary)."""
    if masks is None or masks.shape[1:] == (new_h, new_w):
        return masks
    import cv2

    out = np.zeros((masks.shape[0], new_h, new_w), dtype=np.uint8)
    for k, m in enumerate(masks):
        out[k] = cv2.resize(m, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return out


def _crop_boxes(boxes: np.ndarray, keep: np.ndarray, x0: int, y0: int, cw: int, ch: int,
                min_visibility: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] (and their source indices ``keep``) after cropping the ``cw x ch`` window at ``(x0, y0)``:
    shifted, clipped to the window, and dropped when less than ``min_visibility`` of their area or less than
    1 px in width / height remains."""
    area0 = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, ch)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    vis = (bw * bh) / np.maximum(area0, 1e-6)
    ok = (bw >= 1) & (bh >= 1) & (vis >= min_visibility)
    return boxes[ok], keep[ok]


def _aligned_target(target: dict[str, Any], boxes: np.ndarray, keep: np.ndarray, n: int,
                    size: tuple[int, int]) -> dict[str, Any]:
    """``target`` with the new ``boxes`` and every other per-box tensor (first dim ``n``) indexed by ``keep``;
    ``labels`` int64, ``difficult`` bool, ``size`` the image's (H, W) after the transform."""
    new_target = {}
    keep_t = torch.from_numpy(keep.astype(np.int64))
    for k, v in target.items():
        if k == "boxes":
            continue
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n and k not in ("orig_size", "size"):
            new_target[k] = v[keep_t]
        else:
            new_target[k] = v
    new_target["boxes"] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4)
    if "labels" in new_target:
        new_target["labels"] = new_target["labels"].to(torch.int64)
    if "difficult" in new_target:
        new_target["difficult"] = new_target["difficult"].to(torch.bool)
    new_target["size"] = torch.tensor(size, dtype=torch.int64)
    return new_target
