"""The classification task adapter: PCE classifier, registered datasets + transforms, top-k evaluation."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pce.models.classifier import PCEClassifier, build_classifier

from ..common import RouterLossMixin, SplitDatasetsMixin, head_options, image_batch_to, to_plain
from ..registry import register_task
from .metrics import ClassificationEvaluator

__all__ = ["ClassificationTask"]

HEAD_OPTIONS = ("spp_levels", "spp_mode", "dropout")


@register_task("classification")
class ClassificationTask(RouterLossMixin, SplitDatasetsMixin):
    """Adapter for :class:`pce.engine.Trainer` (protocol in :mod:`pce.tasks.registry`).

    Batches are ``(images [B, C, H, W], targets [B])``. Losses: ``loss_cls`` (cross-entropy with
    ``model.label_smoothing``) and ``loss_router`` (the weighted router regularisers of every PCE layer).
    """

    name = "classification"
    collate_fn = None

    def __init__(self) -> None:
        self.channels_last = False
        self.label_smoothing = 0.0
        self._train: Optional[Tuple[Any, Any, int]] = None  # (train dataset, its data.train config, seed)

    # ------------------------------------------------------------------------------------- model
    def build_model(self, cfg: Any) -> PCEClassifier:
        head = head_options(cfg, HEAD_OPTIONS, "classification")
        if "spp_levels" in head:
            head["spp_levels"] = tuple(head["spp_levels"])
        overrides = to_plain(cfg.model.backbone_overrides)
        self.channels_last = bool(cfg.runtime.channels_last)
        self.label_smoothing = float(cfg.model.label_smoothing)
        self.configure_router_loss(cfg)
        try:
            return build_classifier(cfg.model.backbone, cfg.model.num_classes, **head, **overrides)
        except (KeyError, TypeError) as e:
            raise ValueError(f"model.backbone={cfg.model.backbone!r} / model.backbone_overrides: "
                             f"{e.args[0] if e.args else e}") from e

    # -------------------------------------------------------------------------------------- data
    def _check_classes(self, cfg: Any, split: str, name: str, dataset: Any) -> None:
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) != cfg.model.num_classes:
            raise ValueError(f"data.{split} ({name}) has {len(classes)} classes but model.num_classes is "
                             f"{cfg.model.num_classes}")

    # -------------------------------------------------------------------------------- train / eval
    def _inputs(self, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images = image_batch_to(batch[0], device, self.channels_last)
        return images, torch.as_tensor(batch[1]).to(device, non_blocking=True)

    def task_losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """Cross-entropy of ``model(images)`` (through the wrapper, so DDP's forward synchronises gradients)."""
        images, targets = self._inputs(batch, device)
        logits = model(images)
        return {"loss_cls": F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = self._inputs(batch, device)
        return model(images).float(), targets

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> ClassificationEvaluator:
        names = getattr(dataset, "classes", None)
        if names is not None and len(names) != cfg.model.num_classes:
            names = None
        return ClassificationEvaluator(cfg.model.num_classes, class_names=names, topk=tuple(cfg.eval.topk))

    def batch_images(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def batch_size(self, batch: Any) -> int:
        return int(batch[0].shape[0])
