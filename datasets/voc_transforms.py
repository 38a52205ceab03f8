"""Albumentations-based train/eval transforms for VOC detection and segmentation.

Both transforms take and return tensors in the conventions of :mod:`pce.datasets.voc`:

* detection: ``(image float32 [3, H, W] in [0, 1], target dict)`` -> same; ``target["boxes"]``
  float32 [N, 4] absolute xyxy, ``labels`` int64 [N], ``difficult`` bool [N] (any other per-box
  tensor with first dim N is kept aligned too; ``target["masks"]`` uint8 [N, H, W] object masks are resized
  (nearest), cropped, flipped and padded with the image); ``target["size"]`` int64 [2] (H, W) is the size
  after the transform (``orig_size`` is left untouched). The image is NOT normalised (torchvision
  detection models normalise internally).
* segmentation: ``(image float32 [3, H, W] in [0, 1], mask int64 [H, W])`` -> ``(image float32
  [3, h, w] normalised with mean/std, mask int64 [h, w])`` with ``ignore_index`` (255) in padding.

Randomness uses the transform's own generators, re-seeded once per DataLoader worker from the
worker seed so workers do not repeat each other's augmentations.

This module holds the two registered transforms; their shared pieces (image conversion, colour jitter,
per-worker seeding, the resize rule, the box bookkeeping of a crop) are in :mod:`pce.datasets.voc_transform_utils`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .registry import TRANSFORMS  # noqa: E402
from .voc_transform_utils import (_WorkerSeeded, _aligned_target, _base_scale, _color_jitter,  # noqa: E402
                                  _crop_boxes, _resize_masks, _to_uint8_hwc, _uint8_to_tensor)

__all__ = ["DetectionTransform", "SegmentationTransform", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _detection_train_ops(hflip: float, color_jitter: Any, channel_shift: float | None,
                         black_patches: int | dict | None) -> list[A.BasicTransform]:
    """The albumentations ops of a training :class:`DetectionTransform` (flip, jitter, RGB shift, dropout)."""
    ops: list[A.BasicTransform] = []
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    cj = _color_jitter(color_jitter)
    if cj is not None:
        ops.append(cj)
    if channel_shift:
        v = float(channel_shift)
        ops.append(A.RGBShift(r_shift_limit=(-v, v), g_shift_limit=(-v, v), b_shift_limit=(-v, v), p=0.5))
    if black_patches:
        if isinstance(black_patches, dict):
            kw = {"fill": 0, "p": 0.5, **black_patches}
        else:
            kw = {"num_holes_range": (1, int(black_patches)), "hole_height_range": (0.05, 0.15),
                  "hole_width_range": (0.05, 0.15), "fill": 0, "p": 0.5}
        ops.append(A.CoarseDropout(**kw))
    return ops


@TRANSFORMS.register("voc_detection")
class DetectionTransform(_WorkerSeeded):
    """Box-aware detection transform on ``(image [3, H, W] float, target)``.

    Resizing: the shorter side is scaled to ``min_size`` with the longer side capped at
    ``max_size`` (torchvision rule; ``min_size=None`` keeps the original size). In training the
    image is additionally scaled by ``s ~ U(scale_range)``; when ``s > 1`` a random crop of the
    un-jittered size is taken: boxes are clipped to the crop and dropped when less than
    ``min_visibility`` of their area (or less than 1 px in width/height) remains; ``labels``,
    ``difficult`` and every other per-box field stay aligned. Then: horizontal flip (prob ``hflip``),
    colour jitter (``color_jitter``: float strength, (b, c, s, h) tuple or ColorJitter kwargs),
    ``black_patches`` (int max number of zero-filled holes of 5-15% of the side, or CoarseDropout
    kwargs), ``channel_shift`` (max per-channel RGB shift in 0..255 units). Finally, with
    ``size_divisibility`` the image is zero-padded at the bottom/right to a multiple (boxes
    unchanged). Output image is float32 [3, h, w] in [0, 1] (not normalised).
    """

    def __init__(
        self,
        train: bool,
        min_size: int | None = 600,
        max_size: int | None = 1000,
        hflip: float = 0.5,
        scale_range: tuple[float, float] = (0.8, 1.2),
        color_jitter: float | Sequence[float] | dict | None = (0.2, 0.2, 0.2, 0.02),
        black_patches: int | dict | None = None,
        channel_shift: float | None = None,
        size_divisibility: int | None = None,
        min_visibility: float = 0.3,
        seed: int | None = None,
    ) -> None:
        self.train = train
        self.min_size = min_size
        self.max_size = max_size
        self.hflip = float(hflip)
        self.scale_range = (float(scale_range[0]), float(scale_range[1])) if scale_range else (1.0, 1.0)
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.size_divisibility = size_divisibility
        self.min_visibility = float(min_visibility)
        self._init_rng(seed)
        ops = _detection_train_ops(self.hflip, color_jitter, channel_shift, black_patches) if train else []
        # boxes only go through albumentations when some op moves/hides pixels (flip, dropout)
        self._box_aware = any(isinstance(op, (A.HorizontalFlip, A.CoarseDropout)) for op in ops)
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["idx"], min_visibility=0.0,
                                   clip=True) if self._box_aware else None
        self._aug = A.Compose(ops, bbox_params=bbox_params, seed=seed) if ops else None

    def _composes(self) -> list[A.Compose]:
        return [self._aug] if self._aug is not None else []

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        self._maybe_reseed()
        img = _to_uint8_hwc(image)
        boxes = target["boxes"].detach().cpu().numpy().astype(np.float32).reshape(-1, 4)
        n = boxes.shape[0]
        keep = np.arange(n)
        # object masks [N, H, W] (all N objects) follow every geometric step; _aligned_target keeps the kept ones
        masks = None if target.get("masks") is None else self._check_masks(target["masks"], n, img.shape[:2])
        img, boxes, keep, masks = self._resize(img, boxes, keep, masks)
        img, boxes, keep, masks = self._augment(img, boxes, keep, masks)
        img, masks = self._pad(img, masks)
        if masks is not None:
            target = {**target, "masks": torch.from_numpy(np.ascontiguousarray(masks))}
        return _uint8_to_tensor(img), _aligned_target(target, boxes, keep, n, img.shape[:2])

    @staticmethod
    def _check_masks(masks: Any, n: int, size: tuple[int, ...]) -> np.ndarray:
        m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if m.shape != (n, *size):
            raise ValueError(f"target['masks'] has shape {tuple(m.shape)} (expected [N, H, W] = [{n}, {size[0]}, "
                             f"{size[1]}]: one mask per box, the image's size)")
        return (m > 0).astype(np.uint8)

    def _resize(self, img: np.ndarray, boxes: np.ndarray, keep: np.ndarray,
                masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """1) resize (+ scale jitter and crop in training); boxes end clipped to the image; masks follow."""
        h, w = img.shape[:2]
        s = _base_scale(h, w, self.min_size, self.max_size)
        crop_h, crop_w = max(1, round(h * s)), max(1, round(w * s))
        if self.train and self.scale_range != (1.0, 1.0):
            s *= float(self._rng.uniform(*self.scale_range))
        new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
        if (new_h, new_w) != (h, w):
            interp = cv2.INTER_AREA if new_h < h else cv2.INTER_LINEAR
            img = cv2.resize(img, (new_w, new_h), interpolation=interp)
            masks = _resize_masks(masks, new_h, new_w)
            boxes = boxes * np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
        if self.train and (new_h > crop_h or new_w > crop_w):
            ch, cw = min(crop_h, new_h), min(crop_w, new_w)
            y0 = int(self._rng.integers(0, new_h - ch + 1))
            x0 = int(self._rng.integers(0, new_w - cw + 1))
            img = img[y0:y0 + ch, x0:x0 + cw]
            masks = None if masks is None else masks[:, y0:y0 + ch, x0:x0 + cw]
            boxes, keep = _crop_boxes(boxes, keep, x0, y0, cw, ch, self.min_visibility)
        h, w = img.shape[:2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return img, boxes, keep, masks

    def _augment(self, img: np.ndarray, boxes: np.ndarray, keep: np.ndarray,
                 masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """2) flips / photometric / dropout via albumentations (boxes tracked through an index field; the masks of
        all objects flipped with the image, dropout leaves them)."""
        if self._aug is not None and not self._box_aware:
            img = self._aug(image=img)["image"]
        elif self._aug is not None:
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, keep = boxes[valid], keep[valid]
            extra = {"masks": list(masks)} if masks is not None and len(masks) else {}
            out = self._aug(image=img, bboxes=boxes, idx=np.arange(len(keep), dtype=np.int64), **extra)
            img = out["image"]
            if extra:
                masks = np.stack([np.asarray(m, dtype=np.uint8) for m in out["masks"]])
            sel = np.asarray(out["idx"], dtype=np.int64).reshape(-1)
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            keep = keep[sel]
        return img, boxes, keep, masks

    def _pad(self, img: np.ndarray, masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """3) pad to a multiple of size_divisibility (bottom/right, zeros; boxes unchanged)."""
        if self.size_divisibility:
            d = int(self.size_divisibility)
            ph, pw = (-img.shape[0]) % d, (-img.shape[1]) % d
            if ph or pw:
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
                masks = None if masks is None else np.pad(masks, ((0, 0), (0, ph), (0, pw)))
        return img, masks

    def __repr__(self) -> str:
        return (f"DetectionTransform(train={self.train}, min_size={self.min_size}, max_size={self.max_size}, "
                f"scale_range={self.scale_range}, hflip={self.hflip}, size_divisibility={self.size_divisibility})")


@TRANSFORMS.register("voc_segmentation")
class SegmentationTransform(_WorkerSeeded):
    """Segmentation transform on ``(image [3, H, W] float in [0, 1], mask int64 [H, W])``.

    Train: random scale ``s ~ U(scale_range)`` (image bilinear, mask nearest), horizontal flip,
    colour jitter, normalise with ``mean``/``std``, pad to ``crop_size`` (image with 0 — i.e. the
    mean colour after normalisation — and mask with ``ignore_index``), random crop ``crop_size``.
    Eval: normalise only (whole image; batch padding is done by ``segmentation_collate``).
    Returns ``(image float32 [3, h, w], mask int64 [h, w])``; with training, h, w = crop_size.
    """

    def __init__(
        self,
        train: bool,
        crop_size: int | tuple[int, int] = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float | Sequence[float] | dict | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        seed: int | None = None,
    ) -> None:
        self.train = train
        ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.crop_size = (int(ch), int(cw))
        self.scale_range = (float(scale_range[0]), float(scale_range[1])) if scale_range else (1.0, 1.0)
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.ignore_index = int(ignore_index)
        self.mean, self.std = tuple(mean), tuple(std)
        self._init_rng(seed)
        ops: list[A.BasicTransform] = []
        if train:
            lo, hi = self.scale_range
            if (lo, hi) != (1.0, 1.0):
                ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                                         mask_interpolation=cv2.INTER_NEAREST, p=1.0))
            if hflip > 0:
                ops.append(A.HorizontalFlip(p=float(hflip)))
            cj = _color_jitter(color_jitter)
            if cj is not None:
                ops.append(cj)
        ops.append(A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0))
        if train:
            ops.append(A.PadIfNeeded(min_height=self.crop_size[0], min_width=self.crop_size[1],
                                     position="top_left", border_mode=cv2.BORDER_CONSTANT,
                                     fill=0, fill_mask=self.ignore_index))
            ops.append(A.RandomCrop(height=self.crop_size[0], width=self.crop_size[1]))
        self._aug = A.Compose(ops, seed=seed)

    def _composes(self) -> list[A.Compose]:
        return [self._aug]

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._maybe_reseed()
        img = _to_uint8_hwc(image)
        m = mask.detach().cpu().numpy()
        if m.shape != img.shape[:2]:
            raise ValueError(f"image size {img.shape[:2]} and mask size {m.shape} differ")
        if m.min() < 0 or m.max() > 255:
            raise ValueError(f"mask values must be in 0..255, got range [{m.min()}, {m.max()}]")
        out = self._aug(image=img, mask=m.astype(np.uint8))
        img_t = torch.from_numpy(np.ascontiguousarray(out["image"], dtype=np.float32)).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(np.ascontiguousarray(out["mask"])).to(torch.int64)
        return img_t, mask_t

    def __repr__(self) -> str:
        return (f"SegmentationTransform(train={self.train}, crop_size={self.crop_size}, "
                f"scale_range={self.scale_range}, ignore_index={self.ignore_index})")
