"""A class label for every patch of a routing grid, from plain targets (no task knowledge here: each task adapter's
``patch_labels`` picks the function that fits its batches).

* :func:`class_patch_labels`: one label per image (``labels [B]``) under every patch;
* :func:`mask_patch_labels`: the most frequent pixel label under the patch (``masks [B, H, W]``, ``ignore_index``
  left out; ``-1`` when the patch covers only ignored pixels);
* :func:`box_patch_labels`: the class of the smallest ground-truth box that contains the patch centre, ``0``
  (background) when none does (``targets``: list of ``{"boxes" [n, 4] x1 y1 x2 y2, "labels" [n]}``,
  ``image_sizes``: the ``(H, W)`` the boxes refer to);
* :func:`position_labels`: the grid cell of every patch.

A patch covers the fraction ``[r / gh, (r + 1) / gh) x [c / gw, (c + 1) / gw)`` of the image (the patch grid
tiles the map, which covers the image; a detector's resize keeps fractions).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["position_labels", "class_patch_labels", "mask_patch_labels", "box_patch_labels"]


def position_labels(batch: int, grid: Tuple[int, int]) -> torch.Tensor:
    """``int64 [B, P]``: the grid cell index ``p = row * gw + col`` of every patch."""
    gh, gw = grid
    return torch.arange(gh * gw).repeat(batch, 1)


def class_patch_labels(labels: Any, grid: Tuple[int, int]) -> torch.Tensor:
    """``int64 [B, gh * gw]``: the image label ``labels [B]`` under every patch."""
    gh, gw = int(grid[0]), int(grid[1])
    y = torch.as_tensor(labels).reshape(-1).long().cpu()
    return y.unsqueeze(1).expand(-1, gh * gw).clone()


def mask_patch_labels(masks: Any, grid: Tuple[int, int], num_classes: Optional[int] = None,
                      ignore_index: int = 255) -> torch.Tensor:
    """``int64 [B, gh * gw]``: the most frequent label of ``masks [B, H, W]`` under every patch (``-1``: only
    ignored pixels). ``num_classes`` ``None``: the largest label that is not ``ignore_index``, plus one."""
    m = torch.as_tensor(masks).long().cpu()
    k = int(num_classes) if num_classes else int(m[m != ignore_index].max().item()) + 1
    valid = (m != ignore_index) & (m >= 0) & (m < k)
    onehot = F.one_hot(torch.where(valid, m, torch.zeros_like(m)), k).permute(0, 3, 1, 2).float()
    onehot = onehot * valid.unsqueeze(1)
    counts = F.adaptive_avg_pool2d(onehot, (int(grid[0]), int(grid[1])))  # [B, K, gh, gw]
    lab = counts.argmax(1)
    lab[counts.sum(1) <= 0] = -1
    return lab.reshape(m.shape[0], -1)


def box_patch_labels(targets: Sequence[Mapping[str, Any]], grid: Tuple[int, int],
                     image_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``int64 [B, gh * gw]``: the label of the smallest box of ``targets[b]`` containing each patch centre
    (``0``: none) in an image of ``image_sizes[b] = (H, W)`` pixels."""
    gh, gw = int(grid[0]), int(grid[1])
    rows = (torch.arange(gh).float() + 0.5) / gh
    cols = (torch.arange(gw).float() + 0.5) / gw
    cy, cx = torch.meshgrid(rows, cols, indexing="ij")
    out = []
    for t, (H, W) in zip(targets, image_sizes):
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
        labels = torch.as_tensor(t["labels"]).reshape(-1).long().cpu()
        y, x = (cy * H).reshape(-1, 1), (cx * W).reshape(-1, 1)  # [P, 1]
        inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])  # [P, n]
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).expand_as(inside)
        area = torch.where(inside, area, torch.full_like(area, float("inf")))
        lab = torch.zeros(gh * gw, dtype=torch.int64)
        if boxes.shape[0]:
            best = area.argmin(1)
            hit = inside.any(1)
            lab[hit] = labels[best[hit]]
        out.append(lab)
    return torch.stack(out)
