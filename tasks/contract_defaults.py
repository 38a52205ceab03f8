"""Default members of the task contract (:class:`pce.engine.task.Task`) that most adapters share:
:class:`ToolDefaultsMixin` (a user's images, slides, image-level labels) and :class:`TensorBatchMixin` (batches of
``[B, C, H, W]`` images and their export target). Adapters override what differs."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from pce.engine.phases import find_backbones

__all__ = ["ToolDefaultsMixin", "TensorBatchMixin"]


class ToolDefaultsMixin:
    """Task-contract members most tasks share: no slide tiling, no image-level labels, the deepest backbone
    stride as the smallest input side, user images through ``transform(image, target)``."""

    slide_tile_mode: Optional[str] = None

    def empty_target(self, image: torch.Tensor) -> Any:
        raise NotImplementedError

    def image_labels(self, batch: Any) -> Optional[torch.Tensor]:
        return None

    def min_input_side(self, cfg: Any, model: nn.Module) -> int:
        """The model's deepest feature stride (at least 2 pixels)."""
        strides = [int(i.get("stride", 1)) for bb in find_backbones(model) for i in bb.feature_info]
        return max(strides + [2])

    def prepare_image(self, cfg: Any, image: torch.Tensor, transform: Any) -> Tuple[torch.Tensor, Any]:
        """``transform(image, empty target)`` (the paired transforms of dense targets)."""
        target = self.empty_target(image)
        return (image, target) if transform is None else transform(image, target)


class TensorBatchMixin:
    """Batches ``(images [B, C, H, W], targets)`` of a model that takes normalised ``[B, C, H, W]`` images."""

    def batch_images(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def batch_size(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def export_target(self, model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]
                      ) -> Tuple[nn.Module, Callable[[int, int], Any], Dict[str, Any]]:
        """The whole model (``what="model"``) or its backbone on normalised ``[B, C, *size]`` images."""
        from .export_targets import image_export_target

        return image_export_target(model, cfg, what, size)
