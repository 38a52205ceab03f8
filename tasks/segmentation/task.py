"""The semantic-segmentation task (contract: :class:`pce.engine.task.Task`), the adapter of :class:`pce.engine.Trainer`.

Config (``task = "segmentation"``):

* ``model.backbone``: a PCE preset usable as an smp encoder (``pce_tiny``, ``dense_small``, ...);
  ``model.backbone_overrides``: its backbone options; ``model.num_classes`` (VOC: 21, background included);
  ``model.router_loss_weights`` and ``model.label_smoothing`` as for classification.
* ``model.convert``: :class:`pce.PCEConv2d` in place of chosen convolutions of the built model (module paths
  such as ``net.segmentation_head.0``; :func:`~pce.tasks.common.apply_model_convert`).
* ``model.head`` (all optional): ``arch`` (smp architecture, default ``"FPN"``), ``decoder`` (dict of
  ``smp.create_model`` keyword arguments: ``encoder_depth``, ``decoder_channels``, ``encoder_output_stride``,
  ...), ``ce_weight`` / ``dice_weight`` / ``lovasz_weight``, ``class_weights``, ``ignore_index`` (255),
  ``size_divisibility``, and the evaluation inference ``inference`` (``"whole"`` or ``"slide"``) with
  ``slide_window`` / ``slide_stride`` (int or ``[h, w]``).
* ``data.{train,val,test}``: registered datasets (``voc_segmentation``) and transforms (``voc_segmentation``:
  :class:`pce.datasets.SegmentationTransform`); batches are collated by
  :class:`pce.datasets.SegmentationCollate` (padding to the batch's largest image, masks with ``ignore_index``).
* ``eval.metric``: a key of :meth:`SegmentationEvaluator.compute`, normally ``"mIoU"`` (mode ``max``).

Batches are ``(images [B, 3, H, W], masks int64 [B, H, W])``. Losses: ``loss_ce`` (+ ``loss_dice`` /
``loss_lovasz`` when weighted) and ``loss_router``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.datasets import SegmentationCollate

from pce.analysis.labels import mask_patch_labels
from pce.moe.recorder import unwrap_model

from ..common import (RouterLossMixin, SplitDatasetsMixin, apply_model_convert, head_options, image_batch_to, refuse_mixup,
                      to_plain)
from ..contract_defaults import TensorBatchMixin, ToolDefaultsMixin
from ..registry import register_task
from .evaluator import SegmentationEvaluator
from .model import SegmentationModel, build_segmentation_model

__all__ = ["SegmentationTask", "HEAD_OPTIONS"]

HEAD_OPTIONS = ("arch", "decoder", "ce_weight", "dice_weight", "lovasz_weight", "class_weights", "ignore_index",
                "size_divisibility", "inference", "slide_window", "slide_stride")


def _num_classes(ds: Any) -> Optional[int]:
    n = getattr(ds, "num_classes", None)
    if isinstance(n, int):
        return n
    classes = getattr(ds, "classes", None)
    return len(classes) if classes is not None else None


@register_task("segmentation")
class SegmentationTask(TensorBatchMixin, ToolDefaultsMixin, RouterLossMixin, SplitDatasetsMixin):
    """The segmentation task (contract: :class:`pce.engine.task.Task`): :func:`build_segmentation_model` from the
    config, registered datasets + transforms, :class:`SegmentationCollate`, whole-image or sliding-window
    inference, :class:`SegmentationEvaluator`; a slide is tiled with a probability per pixel."""

    name = "segmentation"
    slide_tile_mode = "segment"

    def __init__(self) -> None:
        self.channels_last = False
        self.ignore_index = 255
        self.inference: Dict[str, Any] = {"mode": "whole", "window": None, "stride": None}
        self.collate_fn = SegmentationCollate(size_divisibility=None, ignore_index=self.ignore_index)
        self._train: Optional[Tuple[Any, Any, int]] = None  # (train dataset, its data.train config, seed)

    # ------------------------------------------------------------------------------------- model
    def build_model(self, cfg: Any) -> SegmentationModel:
        self.configure_router_loss(cfg)
        refuse_mixup(cfg, self.name)
        head = head_options(cfg, HEAD_OPTIONS, "segmentation")
        arch = head.pop("arch", "FPN")
        decoder = dict(head.pop("decoder", None) or {})
        mode = head.pop("inference", "whole")
        window, stride = head.pop("slide_window", None), head.pop("slide_stride", None)
        if mode not in ("whole", "slide"):
            raise ValueError(f"model.head.inference must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide" and window is None:
            raise ValueError("model.head.inference='slide' needs model.head.slide_window")
        self.inference = {"mode": mode, "window": window, "stride": stride}
        self.ignore_index = int(head.get("ignore_index", 255))
        self.collate_fn = SegmentationCollate(size_divisibility=None, ignore_index=self.ignore_index)
        self.channels_last = bool(cfg.runtime.channels_last)
        try:
            model = build_segmentation_model(
                arch, cfg.model.backbone, int(cfg.model.num_classes),
                encoder_overrides=to_plain(cfg.model.backbone_overrides),
                label_smoothing=float(cfg.model.label_smoothing), **head, **decoder)
        except (KeyError, TypeError) as e:
            raise ValueError(f"model.backbone={cfg.model.backbone!r} / model.backbone_overrides / model.head "
                             f"(arch={arch!r}): {e.args[0] if e.args else e}") from e
        return apply_model_convert(model, cfg, self.dummy_inputs(cfg)[0])

    # -------------------------------------------------------------------------------------- data
    def _check_classes(self, cfg: Any, split: str, name: str, dataset: Any) -> None:
        n = _num_classes(dataset)
        if n is not None and n != cfg.model.num_classes:
            raise ValueError(f"data.{split} ({name}) has {n} classes (background included) but "
                             f"model.num_classes is {cfg.model.num_classes}")

    # -------------------------------------------------------------------------------- train / eval
    def _inputs(self, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images = image_batch_to(batch[0], device, self.channels_last)
        return images, torch.as_tensor(batch[1]).to(device, non_blocking=True)

    def task_losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """One forward through ``model(...)`` (so DDP synchronises gradients), then the losses of the wrapped
        :class:`SegmentationModel` on those logits."""
        images, masks = self._inputs(batch, device)
        logits = model(images)
        return unwrap_model(model, stop_at=SegmentationModel).loss_terms(logits, masks)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(labels [B, H, W], masks [B, H, W])`` with the configured whole-image / sliding-window inference."""
        images, masks = self._inputs(batch, device)
        inf = self.inference
        labels = unwrap_model(model, stop_at=SegmentationModel).predict(images, mode=inf["mode"], window=inf["window"],
                                                          stride=inf["stride"])
        return labels, masks

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> SegmentationEvaluator:
        n = int(cfg.model.num_classes)
        classes = list(getattr(dataset, "classes", None) or [])
        if len(classes) == n - 1:
            classes = ["background"] + classes
        names = classes if len(classes) == n else None
        return SegmentationEvaluator(n, ignore_index=self.ignore_index, class_names=names)

    # -------------------------------------------------------------------------- a user's images, routing labels
    def empty_target(self, image: torch.Tensor) -> torch.Tensor:
        """An all-background mask ``int64 [H, W]``."""
        return torch.zeros(image.shape[-2:], dtype=torch.int64)

    def to_input_frame(self, output: torch.Tensor, model_input_size: Tuple[int, int],
                       original_size: Tuple[int, int]) -> torch.Tensor:
        """The label map ``[H', W']`` resized to ``original_size`` ``(H, W)`` by nearest neighbour (pixel centres
        aligned: ``nearest-exact``); unchanged when the sizes agree."""
        size = tuple(int(v) for v in original_size)
        if tuple(output.shape[-2:]) == size:
            return output
        out = torch.nn.functional.interpolate(output[None, None].float(), size=size, mode="nearest-exact")
        return out[0, 0].to(output.dtype)

    def summarize(self, output: torch.Tensor, class_names: Optional[Sequence[str]], score_thr: float = 0.5
                  ) -> Dict[str, Any]:
        """``{"class_pixels": {class: pixel count}}`` of a label map ``[H, W]``."""
        ids, counts = torch.unique(output, return_counts=True)
        return {"class_pixels": {int(i): int(c) for i, c in zip(ids, counts)}}

    def render(self, image: torch.Tensor, output: Any, class_names: Optional[Sequence[str]] = None,
               score_thr: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
        """The label map ``[H, W]`` as a colour overlay of opacity ``alpha`` (background 0 kept)."""
        from ..visualize import overlay_mask

        return overlay_mask(image, output, alpha=alpha)

    def patch_labels(self, batch: Any, grid: Tuple[int, int], num_classes: Optional[int] = None
                     ) -> Optional[torch.Tensor]:
        """The most frequent pixel label under every patch (``ignore_index`` left out): ``int64 [B, gh * gw]``."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return None
        return mask_patch_labels(batch[1], grid, num_classes, self.ignore_index)
