"""The target dict every detection dataset returns (VOC, COCO JSON): one definition of its keys, dtypes and the
clipping of boxes to the image, so that the detection task, its transforms and evaluator see one format."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

__all__ = ["detection_target"]


def detection_target(index: int, boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray, size: tuple[int, int],
                     masks: Optional[np.ndarray] = None, iscrowd: Optional[np.ndarray] = None) -> dict[str, Any]:
    """``{"boxes" float32 [N, 4] xyxy clipped to the image, "labels" int64 [N], "difficult" bool [N],
    "image_id": index, "orig_size" int64 [2] (H, W)}`` plus ``"masks"`` uint8 ``[N, H, W]`` when given; ``size``
    is ``(H, W)``; ``"iscrowd"`` bool ``[N]`` (COCO crowd regions, which the evaluator ignores as pycocotools does)
    when given. The boxes are copied, never clipped in place."""
    h, w = size
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
    target: dict[str, Any] = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(np.asarray(labels)),
                              "difficult": torch.from_numpy(np.asarray(difficult)), "image_id": index,
                              "orig_size": torch.tensor([h, w], dtype=torch.int64)}
    if iscrowd is not None:
        target["iscrowd"] = torch.from_numpy(np.asarray(iscrowd, dtype=bool))
    if masks is not None:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
    return target
