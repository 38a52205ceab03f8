"""The detection task adapter: Faster R-CNN, Mask R-CNN, RetinaNet or FCOS + FPN on a PCE backbone, VOC-format data,
COCO / VOC AP evaluation (box AP; mask AP too for Mask R-CNN).

Config (see :mod:`pce.engine.defaults`)::

    task = "detection"
    model = dict(backbone="pce_tiny", num_classes=5,               # classes + background
                 backbone_overrides=dict(...),
                 convert=[dict(target="roi_heads.box_head.*", ...)],   # optional: pce.PCEConv2d anywhere
                 head=dict(arch="faster_rcnn",                     # or "mask_rcnn", "retinanet", "fcos"
                           fpn_channels=128, min_size=256, max_size=256, representation_size=256,
                           box_score_thresh=0.01, ...))            # any build_detector option
    data = dict(train=dict(name="voc_detection",
                           kwargs=dict(root="data/demo_voc", year="2007", image_set="train",
                                       demo=dict(num_train=400, num_val=100, image_size=128)),
                           transform=dict(name="voc_detection", kwargs=dict(min_size=256, max_size=256))), ...)
    eval = dict(metric="mAP", mode="max")                          # or "AP50", "AP50_voc07", "AP50_voc12"

Dataset kwargs: ``demo`` (``True`` or a dict of :func:`~pce.datasets.demo_voc.make_demo_voc` options) generates
the procedural demo dataset under ``root`` first when it is missing, and makes its classes
(:data:`~pce.datasets.demo_voc.DEMO_CLASSES`) the default ``classes``. The transform gets ``train=True`` on
the train split unless its kwargs say otherwise, and the train transform is re-seeded every epoch.

Instance segmentation (``head.arch="mask_rcnn"``): the datasets need ``kwargs=dict(masks=True)`` (per-object
masks from ``SegmentationObject``, ``target["masks"]`` uint8 ``[N, H, W]``); the evaluator then adds COCO mask AP
(``segm_mAP``, ``segm_AP50``, ...) to the box AP.

Batches are ``(list of images [3, H_i, W_i] in [0, 1], list of target dicts)`` (:func:`detection_collate`).
Training drops ``difficult`` and degenerate boxes (the evaluator ignores difficult objects); the losses are
torchvision's four plus ``loss_router``. ``predict`` returns ``(detections, targets)`` for
:meth:`DetectionEvaluator.update`, in the coordinates of the transformed images.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.datasets import TRANSFORMS
from pce.datasets.collate import detection_collate
from pce.engine.task import ExportTarget

from pce.analysis.labels import box_patch_labels
from pce.moe.recorder import unwrap_model

from ..common import RouterLossMixin, SplitDatasetsMixin, accepts, apply_model_convert, refuse_mixup, to_plain
from ..contract_defaults import ToolDefaultsMixin
from ..registry import register_task
from .evaluator import DetectionEvaluator
from .model import build_detector

__all__ = ["DetectionTask"]

_TUPLE_OPTIONS = ("aspect_ratios", "image_mean", "image_std", "min_size", "mask_layers")


@register_task("detection")
class DetectionTask(ToolDefaultsMixin, RouterLossMixin, SplitDatasetsMixin):
    """The detection task (contract: :class:`pce.engine.task.Task`); see the module doc. No slide tiling."""

    name = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(self) -> None:
        self._transform: Optional[nn.Module] = None   # the model's GeneralizedRCNNTransform (for batch_images)
        self._train: Optional[Tuple[Any, Any, int]] = None

    # ------------------------------------------------------------------------------------- model
    def build_model(self, cfg: Any) -> nn.Module:
        self.configure_router_loss(cfg)
        refuse_mixup(cfg, self.name)
        head = to_plain(cfg.model.head)
        for k in _TUPLE_OPTIONS:
            if isinstance(head.get(k), list):
                head[k] = tuple(head[k])
        if isinstance(head.get("anchor_sizes"), list):
            head["anchor_sizes"] = tuple(tuple(s) if isinstance(s, list) else s for s in head["anchor_sizes"])
        for k in ("backbone", "num_classes", "backbone_overrides", "router_loss_weights"):
            if k in head:
                raise ValueError(f"model.head.{k}: set model.{k} instead")
        try:
            model = build_detector(cfg.model.backbone, num_classes=int(cfg.model.num_classes),
                                   backbone_overrides=to_plain(cfg.model.backbone_overrides),
                                   **head)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"model (backbone={cfg.model.backbone!r}, backbone_overrides, head): "
                             f"{e.args[0] if e.args else e}") from e
        self._transform = copy.deepcopy(model.transform).eval()
        return apply_model_convert(model, cfg, list(self.dummy_inputs(cfg)[0]))

    # -------------------------------------------------------------------------------------- data
    def _build_transform(self, split: str, split_cfg: Any, extra: Optional[Dict[str, Any]] = None) -> Any:
        """The split's transform, with ``train=(split == "train")`` unless its kwargs set ``train``."""
        name = split_cfg.transform.name
        if name and "train" not in split_cfg.transform.kwargs and accepts(TRANSFORMS.get(name), "train"):
            extra = {"train": split == "train", **(extra or {})}
        return super()._build_transform(split, split_cfg, extra)

    def _check_classes(self, cfg: Any, split: str, name: str, dataset: Any) -> None:
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) + 1 != cfg.model.num_classes:
            raise ValueError(f"data.{split} ({name}) has {len(classes)} classes, so model.num_classes must be "
                             f"{len(classes) + 1} (background included), got {cfg.model.num_classes}")

    # -------------------------------------------------------------------------------- train / eval
    @staticmethod
    def _train_targets(targets: Sequence[Mapping[str, Any]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
        out = []
        for t in targets:
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if "difficult" in t:
                keep &= ~torch.as_tensor(t["difficult"], dtype=torch.bool).reshape(-1)
            out.append({"boxes": boxes[keep].to(device, non_blocking=True),
                        "labels": labels[keep].to(device, non_blocking=True)})
            if "masks" in t:
                masks = torch.as_tensor(t["masks"], dtype=torch.uint8)
                out[-1]["masks"] = masks.reshape(-1, *masks.shape[-2:])[keep].to(device, non_blocking=True)
        return out

    def task_losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """torchvision's losses (``loss_``-prefixed), computed inside ``model(...)`` (DDP-safe)."""
        images, targets = batch[0], batch[1]
        images = [im.to(device, non_blocking=True) for im in images]
        if getattr(unwrap_model(model), "predicts_masks", False) and not all("masks" in t for t in targets):
            raise ValueError("data.train: the model predicts masks (model.head.arch='mask_rcnn') but the targets have "
                             "no 'masks' (set data.train.kwargs.masks=True: per-object masks from SegmentationObject)")
        losses = model(images, self._train_targets(targets, device))
        # RetinaNet / FCOS name theirs "classification", ...: every task loss is logged as loss_*
        return {(k if k.startswith("loss") else f"loss_{k}"): v.float() for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[List[Dict[str, torch.Tensor]], list]:
        images, targets = batch[0], batch[1]
        dets = model([im.to(device, non_blocking=True) for im in images])
        preds = [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(),
                  "labels": d["labels"].cpu()} for d in dets]
        for p, d in zip(preds, dets):
            if "masks" in d:  # Mask R-CNN: [N, 1, H, W] probabilities -> binary uint8 [N, H, W]
                p["masks"] = (d["masks"][:, 0] > 0.5).to(torch.uint8).cpu()
        return preds, list(targets)

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> DetectionEvaluator:
        names = getattr(dataset, "classes", None)
        if names is None and hasattr(dataset, "dataset"):  # a Subset
            names = getattr(dataset.dataset, "classes", None)
        if names is None or len(names) + 1 != cfg.model.num_classes:
            names = [f"class{i}" for i in range(1, int(cfg.model.num_classes))]
        return DetectionEvaluator(list(names))

    # ------------------------------------------------------------------------------------- helpers
    def batch_images(self, batch: Any) -> torch.Tensor:
        """The batch as the backbone sees it (normalised, resized, padded ``[B, 3, H, W]``), for K-Means."""
        if self._transform is None:
            raise RuntimeError("DetectionTask.batch_images needs build_model(cfg) first (it uses the model's "
                               "preprocessing)")
        with torch.no_grad():
            return self._transform([im.float().cpu() for im in batch[0]])[0].tensors

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    # -------------------------------------------------------------------------- a user's images, routing labels
    def empty_target(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """No boxes: ``{"boxes" [0, 4], "labels" [0], "difficult" [0]}``."""
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "difficult": torch.zeros(0, dtype=torch.bool)}

    def prepare_image(self, cfg: Any, image: torch.Tensor, transform: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """``transform(image, empty target)``, without the transform's ``size_divisibility`` padding (the model
        pads its batch itself): the model input is exactly the resized image, so :meth:`to_input_frame` scales by
        its size. The resized frame is read from a probe box over the whole image, which the transform scales."""
        target = self.empty_target(image)
        if transform is None:
            return image, target
        h, w = image.shape[-2:]
        probe = {"boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]]), "labels": torch.zeros(1, dtype=torch.int64),
                 "difficult": torch.zeros(1, dtype=torch.bool)}
        x, got = transform(image, probe)
        boxes = torch.as_tensor(got.get("boxes", torch.zeros(0, 4))).reshape(-1, 4)
        if len(boxes) == 1:
            rw, rh = int(round(float(boxes[0, 2]))), int(round(float(boxes[0, 3])))
            if 0 < rh <= x.shape[-2] and 0 < rw <= x.shape[-1]:
                x = x[..., :rh, :rw]
        return x.contiguous(), target

    def to_input_frame(self, output: Mapping[str, torch.Tensor], model_input_size: Tuple[int, int],
                       original_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Boxes ``xyxy`` scaled from ``model_input_size`` ``(H', W')`` to ``original_size`` ``(H, W)``
        (x by ``W / W'``, y by ``H / H'``); masks ``[N, (1,) H', W']`` resized to ``[N, H, W]`` (nearest); scores
        and labels as they are."""
        (mh, mw), (h, w) = model_input_size, original_size
        scale = torch.tensor([w / mw, h / mh, w / mw, h / mh], dtype=torch.float32)
        out = dict(output)
        out["boxes"] = torch.as_tensor(output["boxes"]).float().reshape(-1, 4) * scale
        if output.get("masks") is not None:
            m = torch.as_tensor(output["masks"])
            m = m.reshape(-1, 1, *m.shape[-2:])[..., :mh, :mw].float()
            out["masks"] = nn.functional.interpolate(m, size=(h, w), mode="nearest")[:, 0].to(torch.uint8) \
                if len(m) else torch.zeros(0, h, w, dtype=torch.uint8)
        return out

    def summarize(self, output: Mapping[str, torch.Tensor], class_names: Optional[Sequence[str]],
                  score_thr: float = 0.5) -> Dict[str, Any]:
        """The detections scoring at least ``score_thr``: ``{"boxes", "labels", "scores", "names"}``; with
        ``masks`` ``[N, (1,) H, W]`` (Mask R-CNN) also ``"mask_pixels"`` (each kept object's mask area in pixels)
        and ``"objects"`` (``"3 objects with masks"``)."""
        keep = output["scores"] >= score_thr
        labels = output["labels"][keep].tolist()
        names = class_names
        out = {"boxes": [[round(v, 2) for v in b] for b in output["boxes"][keep].tolist()], "labels": labels,
               "scores": [round(v, 4) for v in output["scores"][keep].tolist()],
               "names": [names[c - 1] if names and 1 <= c <= len(names) else str(c) for c in labels]}
        masks = output.get("masks")
        if masks is not None:
            kept = torch.as_tensor(masks)[keep]
            out["mask_pixels"] = (kept.reshape(len(kept), -1) > 0).sum(1).tolist()
            out["objects"] = f"{len(labels)} object{'' if len(labels) == 1 else 's'} with masks"
        return out

    def render(self, image: torch.Tensor, output: Mapping[str, Any], class_names: Optional[Sequence[str]] = None,
               score_thr: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
        """Boxes with ``"name score"`` captions (scores below ``score_thr`` left out; ground truth, without
        scores, drawn whole); with ``masks`` ``[N, H, W]`` (Mask R-CNN), the kept objects' masks under them in
        their class colours (``alpha``; higher scores on top)."""
        from ..visualize import draw_detections, overlay_mask

        masks = output.get("masks")
        if masks is not None and len(masks):
            scores = output.get("scores")
            order = torch.argsort(torch.as_tensor(scores), stable=True) if scores is not None else range(len(masks))
            label_map = torch.zeros(masks.shape[-2:], dtype=torch.int64)
            for i in order:
                if scores is None or float(scores[i]) >= score_thr:
                    label_map[torch.as_tensor(masks[i]).reshape(label_map.shape) > 0] = int(output["labels"][i])
            image = overlay_mask(image, label_map, alpha=alpha)
        return draw_detections(image, output["boxes"], output["labels"], output.get("scores"), class_names,
                               score_thr=score_thr)

    def patch_labels(self, batch: Any, grid: Tuple[int, int], num_classes: Optional[int] = None
                     ) -> Optional[torch.Tensor]:
        """The class of the smallest ground-truth box containing each patch centre, 0 (background) when none:
        ``int64 [B, gh * gw]`` (boxes in the coordinates of the batch's images)."""
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return None
        return box_patch_labels(list(batch[1]), grid, [tuple(im.shape[-2:]) for im in batch[0]])

    # ---------------------------------------------------------------------------------------------- export
    def export_target(self, model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]) -> ExportTarget:
        """The whole detector (any ``model.head.arch``) when ``torch.export`` captures it, else its backbone + FPN
        on the preprocessed batch (``what="backbone"``: the PCE backbone on that batch)."""
        from ..export_targets import detection_export_target

        return detection_export_target(model, cfg, what, size)
