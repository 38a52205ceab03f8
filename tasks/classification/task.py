"""The classification task adapter: PCE classifier, registered datasets + transforms, top-k evaluation."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pce.models.classifier import PCEClassifier, build_classifier

from pce.analysis.labels import class_patch_labels

from ..common import RouterLossMixin, SplitDatasetsMixin, apply_model_convert, head_options, image_batch_to, to_plain
from ..contract_defaults import TensorBatchMixin, ToolDefaultsMixin
from ..registry import register_task
from .metrics import ClassificationEvaluator
from .recipe import ClassificationLoss, build_mixup

__all__ = ["ClassificationTask"]

HEAD_OPTIONS = ("spp_levels", "spp_mode", "dropout")


@register_task("classification")
class ClassificationTask(TensorBatchMixin, ToolDefaultsMixin, RouterLossMixin, SplitDatasetsMixin):
    """The classification task (contract: :class:`pce.engine.task.Task`).

    Batches are ``(images [B, C, H, W], targets [B])``. Losses: ``loss_cls`` (cross-entropy with
    ``model.label_smoothing``; with ``data.mixup`` timm's Mixup / CutMix of the batch scored by timm's
    ``SoftTargetCrossEntropy``, :mod:`.recipe`) and ``loss_router`` (the weighted router regularisers of every PCE
    layer). The routing statistics read the batch's own (unmixed) labels.
    A user's image is resized to ``model.input_shape``; a slide is tiled with one probability per tile.
    """

    name = "classification"
    collate_fn = None
    slide_tile_mode = "classify"

    def __init__(self) -> None:
        self.channels_last = False
        self.label_smoothing = 0.0
        self.criterion = ClassificationLoss()
        self._train: Optional[Tuple[Any, Any, int]] = None  # (train dataset, its data.train config, seed)

    # ------------------------------------------------------------------------------------- model
    def build_model(self, cfg: Any) -> PCEClassifier:
        head = head_options(cfg, HEAD_OPTIONS, "classification")
        if "spp_levels" in head:
            head["spp_levels"] = tuple(head["spp_levels"])
        overrides = to_plain(cfg.model.backbone_overrides)
        self.channels_last = bool(cfg.runtime.channels_last)
        self.label_smoothing = float(cfg.model.label_smoothing)
        self.criterion = ClassificationLoss(build_mixup(cfg), self.label_smoothing)
        self.configure_router_loss(cfg)
        try:
            model = build_classifier(cfg.model.backbone, cfg.model.num_classes, **head, **overrides)
        except (KeyError, TypeError) as e:
            raise ValueError(f"model.backbone={cfg.model.backbone!r} / model.backbone_overrides: "
                             f"{e.args[0] if e.args else e}") from e
        return apply_model_convert(model, cfg, self.dummy_inputs(cfg)[0])

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
        """Cross-entropy of ``model(images)`` (through the wrapper, so DDP's forward synchronises gradients), on the
        Mixup / CutMix of the batch when ``data.mixup`` is on."""
        images, targets = self._inputs(batch, device)
        images, soft = self.criterion.mix(images, targets)
        logits = model(images)
        return {"loss_cls": self.criterion.loss(logits.float(), targets, soft)}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = self._inputs(batch, device)
        return model(images).float(), targets

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> ClassificationEvaluator:
        names = getattr(dataset, "classes", None)
        if names is not None and len(names) != cfg.model.num_classes:
            names = None
        return ClassificationEvaluator(cfg.model.num_classes, class_names=names, topk=tuple(cfg.eval.topk))

    # -------------------------------------------------------------------------- a user's images, routing labels
    def empty_target(self, image: torch.Tensor) -> int:
        return 0

    def prepare_image(self, cfg: Any, image: torch.Tensor, transform: Any) -> Tuple[torch.Tensor, int]:
        """``transform(image)`` resized (bilinear, antialiased) to ``model.input_shape`` when it differs."""
        x = image if transform is None else transform(image)
        size = tuple(int(v) for v in cfg.model.input_shape[1:])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x, self.empty_target(image)

    def min_input_side(self, cfg: Any, model: nn.Module) -> int:
        """1: any image is resized to ``model.input_shape``."""
        return 1

    def to_input_frame(self, output: torch.Tensor, model_input_size: Tuple[int, int],
                       original_size: Tuple[int, int]) -> torch.Tensor:
        """Logits ``[K]`` belong to the whole image, whatever its size: as they are."""
        return output

    def summarize(self, output: torch.Tensor, class_names: Optional[Sequence[str]], score_thr: float = 0.5
                  ) -> Dict[str, Any]:
        """``{"top5": [{"class", "name", "prob"}, ...]}`` of logits ``[K]``."""
        prob = output.float().softmax(-1)
        top = prob.topk(min(5, prob.numel()))
        names = class_names
        return {"top5": [{"class": int(i), "name": names[int(i)] if names and int(i) < len(names) else str(int(i)),
                          "prob": float(p)} for p, i in zip(top.values, top.indices)]}

    def render(self, image: torch.Tensor, output: Any, class_names: Optional[Sequence[str]] = None,
               score_thr: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
        """A captioned frame: ``"name prob"`` of the top class of logits ``[K]``, or ``"name"`` of a label."""
        from ..visualize import caption_frame

        out = torch.as_tensor(output)
        if out.dim() >= 1 and out.numel() > 1:
            prob = out.detach().float().reshape(-1).softmax(0)
            return caption_frame(image, int(prob.argmax()), float(prob.max()), class_names)
        return caption_frame(image, int(out), None, class_names)

    def patch_labels(self, batch: Any, grid: Tuple[int, int], num_classes: Optional[int] = None
                     ) -> Optional[torch.Tensor]:
        """The image's label under every patch: ``int64 [B, gh * gw]``."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return None
        return class_patch_labels(batch[1], grid)

    def image_labels(self, batch: Any) -> Optional[torch.Tensor]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return None
        return torch.as_tensor(batch[1]).reshape(-1).long().cpu()
