"""Collate functions for detection (variable-size lists) and segmentation (pad to a common size)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["detection_collate", "segmentation_collate", "SegmentationCollate"]


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """[(image [3, H_i, W_i], target_i), ...] -> ([image_i, ...], [target_i, ...]) (no stacking)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def segmentation_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
    size_divisibility: int | None = None,
    ignore_index: int = 255,
    image_fill: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image [C, H_i, W_i], mask [H_i, W_i]), ...] -> (images [B, C, H, W], masks int64 [B, H, W]).

    Stacks directly when all sizes match (and already satisfy ``size_divisibility``); otherwise
    pads each sample at the bottom/right to the batch max size (rounded up to a multiple of
    ``size_divisibility`` if given): images with ``image_fill`` (0), masks with ``ignore_index``.
    """
    if len(batch) == 0:
        raise ValueError("segmentation_collate got an empty batch")
    images = [b[0] for b in batch]
    masks = [b[1] for b in batch]
    for i, (im, m) in enumerate(zip(images, masks)):
        if im.ndim != 3 or m.ndim != 2 or tuple(im.shape[-2:]) != tuple(m.shape):
            raise ValueError(f"sample {i}: image {tuple(im.shape)} and mask {tuple(m.shape)} do not match ([C,H,W] and [H,W])")
    H = max(im.shape[-2] for im in images)
    W = max(im.shape[-1] for im in images)
    if size_divisibility:
        d = int(size_divisibility)
        H, W = -(-H // d) * d, -(-W // d) * d
    if all(tuple(im.shape[-2:]) == (H, W) for im in images):
        return torch.stack(images), torch.stack([m.to(torch.int64) for m in masks])
    out_im = images[0].new_full((len(images), images[0].shape[0], H, W), image_fill)
    out_m = torch.full((len(masks), H, W), ignore_index, dtype=torch.int64)
    for i, (im, m) in enumerate(zip(images, masks)):
        h, w = im.shape[-2:]
        out_im[i, :, :h, :w] = im
        out_m[i, :h, :w] = m
    return out_im, out_m


class SegmentationCollate:
    """Picklable ``collate_fn`` wrapper around :func:`segmentation_collate` with fixed options."""

    def __init__(self, size_divisibility: int | None = None, ignore_index: int = 255, image_fill: float = 0.0) -> None:
        self.size_divisibility = size_divisibility
        self.ignore_index = ignore_index
        self.image_fill = image_fill

    def __call__(self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return segmentation_collate(batch, self.size_divisibility, self.ignore_index, self.image_fill)
