"""Object-detection evaluation: COCO mAP (via pycocotools) and PASCAL VOC AP50.

Conventions shared by every metric computed here:

* Boxes are ``xyxy`` in absolute pixel coordinates and treated as *continuous*:
  ``area = (x2 - x1) * (y2 - y1)``.  The VOC devkit's ``+1`` pixel convention is
  **not** used, so VOC numbers computed here can differ slightly from the
  official MATLAB devkit on small boxes; the COCO numbers use the same
  continuous IoU as pycocotools.
* Labels are ``1..C`` (``0`` is reserved for background and rejected);
  ``class_names[c - 1]`` names label ``c``.
* All results are fractions in ``[0, 1]``.  Classes with no (non-difficult)
  ground truth are excluded from every mean and reported as ``float('nan')`` in
  the per-class tables; a mean over no evaluable class is ``nan`` as well.

VOC protocol (``AP50_voc07`` / ``AP50_voc12``), per class: detections of all
images are sorted by descending score (stable sort, ties keep insertion
order); each detection is assigned the ground-truth box of the same class and
image with the highest IoU; if that IoU is ``>= 0.5`` (as in the MATLAB
devkit) the detection is a TP when the box is not yet matched, an FP when it is
(duplicate), and *ignored* (neither TP nor FP) when the box is difficult.
Otherwise it is an FP.  ``AP50_voc07`` is the 11-point interpolated AP
(recall thresholds 0, 0.1, ..., 1); ``AP50_voc12`` is the area under the
monotone precision envelope (VOC2010+).  No per-image detection cap.

COCO protocol (``mAP``, ``AP50``, ``AP75``, ``per_class_AP``): pycocotools'
``COCOeval`` on an in-memory ground truth, area range "all", at most
``max_dets`` (default 100) detections per image, 101-point interpolation.
Difficult boxes (when ``use_difficult=False``) are given ``iscrowd=1``, which
is how pycocotools marks a box as *ignore*: they count as no positive and
detections matched to them are neither TP nor FP.  Unlike a true COCO crowd
region, IoU with a difficult box is the ordinary IoU (not intersection over
detection area) and, as for every COCO ignore region, several detections may
be matched to (and thereby ignored by) one difficult box.

Masks (instance segmentation, e.g. Mask R-CNN): when the predictions carry
``masks`` (``[N, H, W]`` binary or ``[N, 1, H, W]`` probabilities, thresholded at
0.5) and the targets ``masks`` ``[M, H, W]``, :meth:`~DetectionEvaluator.compute`
adds the same COCO protocol on masks: pycocotools ``COCOeval(iouType="segm")`` on
``pycocotools.mask.encode`` RLEs (mask IoU; difficult objects ignored the same
way, with ordinary IoU): ``segm_mAP``, ``segm_AP50``, ``segm_AP75`` and
``segm_per_class_AP``. Box AP is computed as always.

What lives where (``pce.tasks.detection``): this module holds :class:`DetectionEvaluator` (accumulation,
merging across ranks, the summary of :meth:`~DetectionEvaluator.compute` and its table), the public entry
point; :mod:`~pce.tasks.detection.eval_records` checks inputs and builds the per-image records;
:mod:`~pce.tasks.detection.ap_voc` holds the VOC protocol (:func:`box_iou_xyxy`, :func:`voc_ap`, per-class
matching) and :mod:`~pce.tasks.detection.ap_coco` the pycocotools bridge.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

try:  # torch is optional for this module; tensors are converted if it is present.
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

from .ap_coco import coco_ap_per_threshold, coco_precision, nanmean
from .ap_voc import voc_class_ap
from .eval_records import ArrayLike, make_record

__all__ = ["DetectionEvaluator"]

_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


class DetectionEvaluator:
    """Accumulates per-image detections / ground truth and computes COCO + VOC AP.

    Args:
        class_names: names of the C foreground classes; label ``c`` (1..C) is
            ``class_names[c - 1]``.
        iou_thresholds: IoU thresholds of the COCO ``mAP`` (default 0.50:0.05:0.95).
            ``AP50`` / ``AP75`` are ``nan`` when 0.5 / 0.75 are not among them.
        use_difficult: if True, difficult boxes are ordinary positives.
        max_dets: COCO per-image detection cap (pycocotools default 100).

    Distributed use: every rank calls :meth:`update`; then either
    :meth:`synchronize` (uses ``torch.distributed.all_gather_object``) or ship
    :meth:`state_dict` yourself and :meth:`merge` it.  When an ``image_id`` is
    given, a merged record whose ``image_id`` is already present is skipped
    (e.g. the samples ``DistributedSampler`` repeats to pad the last batch).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        iou_thresholds: Optional[Sequence[float]] = None,
        use_difficult: bool = False,
        max_dets: int = 100,
    ) -> None:
        if isinstance(class_names, str) or len(class_names) == 0:
            raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
        self.class_names: List[str] = [str(n) for n in class_names]
        thr = _COCO_IOU_THRESHOLDS if iou_thresholds is None else np.asarray(iou_thresholds, dtype=np.float64)
        thr = np.atleast_1d(thr).astype(np.float64)
        if thr.ndim != 1 or thr.size == 0 or np.any((thr <= 0) | (thr > 1)):
            raise ValueError(f"iou_thresholds must be a non-empty 1-D list in (0, 1], got {iou_thresholds!r}")
        self.iou_thresholds: np.ndarray = thr
        self.use_difficult = bool(use_difficult)
        if int(max_dets) < 1:
            raise ValueError(f"max_dets must be >= 1, got {max_dets!r}")
        self.max_dets = int(max_dets)
        self._images: List[Dict[str, Any]] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return len(self._images)

    def reset(self) -> None:
        """Forget every accumulated image."""
        self._images = []

    # ------------------------------------------------------------------ input

    def update(self, predictions: Sequence[Mapping[str, ArrayLike]], targets: Sequence[Mapping[str, ArrayLike]]) -> None:
        """Add one batch: ``predictions`` / ``targets`` are lists with one dict per image.

        predictions[i]: "boxes" float [N, 4] xyxy absolute, "scores" [N], "labels" int [N] in 1..C,
        optional "masks" [N, H, W] (or [N, 1, H, W] probabilities).
        targets[i]: "boxes" [M, 4], "labels" [M], optional "difficult" bool [M], optional "image_id",
        "masks" [M, H, W] when the predictions have masks.
        Tensors (any device) or numpy arrays.
        """
        if isinstance(predictions, Mapping) or isinstance(targets, Mapping):
            raise TypeError("predictions and targets must be lists of per-image dicts, not a single dict")
        if len(predictions) != len(targets):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
        self._images.extend(make_record(p, t, i, self.num_classes)
                            for i, (p, t) in enumerate(zip(predictions, targets)))

    # ------------------------------------------------------------------ distributed

    def state_dict(self) -> Dict[str, Any]:
        """Picklable state: settings plus one dict of numpy arrays per image."""
        return {
            "class_names": list(self.class_names),
            "iou_thresholds": self.iou_thresholds.tolist(),
            "use_difficult": self.use_difficult,
            "max_dets": self.max_dets,
            "images": [dict(r) for r in self._images],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulated images by those of ``state`` (settings must match)."""
        self._check_compatible(state)
        self._images = []
        self._extend(state["images"])

    def _check_compatible(self, state: Mapping[str, Any]) -> None:
        if list(state["class_names"]) != self.class_names:
            raise ValueError(f"class_names differ: {list(state['class_names'])} vs {self.class_names}")
        if not np.allclose(np.asarray(state["iou_thresholds"]), self.iou_thresholds) or bool(
            state["use_difficult"]
        ) != self.use_difficult or int(state.get("max_dets", self.max_dets)) != self.max_dets:
            raise ValueError("cannot merge evaluators with different iou_thresholds/use_difficult/max_dets")

    def _extend(self, images: Sequence[Mapping[str, Any]]) -> None:
        seen = {r["image_id"] for r in self._images if r["image_id"] is not None}
        for r in images:
            if r["image_id"] is not None:
                if r["image_id"] in seen:
                    continue
                seen.add(r["image_id"])
            self._images.append(dict(r))

    def merge(self, other: Union["DetectionEvaluator", Mapping[str, Any]]) -> "DetectionEvaluator":
        """Append the images of another evaluator (or its ``state_dict()``); returns self.

        Records whose non-None ``image_id`` is already present are skipped.
        """
        state = other.state_dict() if isinstance(other, DetectionEvaluator) else other
        self._check_compatible(state)
        self._extend(state["images"])
        return self

    def synchronize(self, group: Any = None) -> None:
        """All-gather the images of every rank (in rank order) so each rank holds the full set.

        No-op when ``torch.distributed`` is unavailable, uninitialised or has one process.
        """
        if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size(group)
        if world == 1:
            return
        states: List[Any] = [None] * world
        torch.distributed.all_gather_object(states, self.state_dict(), group=group)
        self._images = []
        for s in states:
            self.merge(s)

    # ------------------------------------------------------------------ results

    def _has_positive(self) -> np.ndarray:
        """[C] bool: class has at least one positive (non-ignored) GT box."""
        has = np.zeros(self.num_classes, dtype=bool)
        for r in self._images:
            lab = r["gt_labels"] if self.use_difficult else r["gt_labels"][~r["gt_difficult"]]
            has[lab - 1] = True
        return has

    def compute(self) -> Dict[str, Any]:
        """Evaluate everything accumulated so far.

        Returns fractions: "mAP" (COCO AP@iou_thresholds), "AP50", "AP75" (COCO),
        "AP50_voc07", "AP50_voc12", "per_class_AP50" (VOC12-style, {name: v}),
        "per_class_AP50_voc07", "per_class_AP" (COCO AP@iou_thresholds),
        "num_gt" ({name: positives}) and "num_images"; with masks also "segm_mAP", "segm_AP50", "segm_AP75"
        and "segm_per_class_AP" (COCO mask AP).  Excluded classes -> nan.
        """
        voc = [voc_class_ap(self._images, c, self.use_difficult) for c in range(1, self.num_classes + 1)]
        ap07 = np.array([v["ap07"] for v in voc], dtype=np.float64)
        ap12 = np.array([v["ap12"] for v in voc], dtype=np.float64)
        names = self.class_names
        out = {**self._coco("bbox", ""),
               "AP50_voc07": nanmean(ap07),
               "AP50_voc12": nanmean(ap12),
               "per_class_AP50": {n: float(v) for n, v in zip(names, ap12)},
               "per_class_AP50_voc07": {n: float(v) for n, v in zip(names, ap07)},
               "num_gt": {n: int(v["npos"]) for n, v in zip(names, voc)},
               "num_images": self.num_images}
        with_masks = [r.get("pred_rles") is not None for r in self._images]
        if any(with_masks):
            if not all(with_masks):
                raise ValueError(f"{with_masks.count(False)} of {len(with_masks)} images were given without masks "
                                 "(mask AP needs masks in every image's predictions and targets)")
            out.update(self._coco("segm", "segm_"))
        return out

    def _coco(self, iou_type: str, prefix: str) -> Dict[str, Any]:
        """COCO ``mAP`` / ``AP50`` / ``AP75`` / ``per_class_AP`` on boxes or masks, keys prefixed by ``prefix``."""
        prec = coco_precision(self._images, self.class_names, self.iou_thresholds, self.max_dets, self.use_difficult,
                              iou_type)
        per_thr_cls = coco_ap_per_threshold(prec, self._has_positive(), len(self.iou_thresholds))

        def _at(thr: float) -> float:
            hit = np.nonzero(np.isclose(self.iou_thresholds, thr))[0]
            return nanmean(per_thr_cls[hit[0]]) if hit.size else math.nan

        coco_cls = [nanmean(per_thr_cls[:, c]) for c in range(self.num_classes)]
        return {f"{prefix}mAP": nanmean(per_thr_cls.ravel()), f"{prefix}AP50": _at(0.5), f"{prefix}AP75": _at(0.75),
                f"{prefix}per_class_AP": {n: float(v) for n, v in zip(self.class_names, coco_cls)}}

    def format_table(self, results: Optional[Mapping[str, Any]] = None, digits: int = 1) -> str:
        """Per-class text table (values in percent); ``results`` defaults to :meth:`compute`."""
        res = self.compute() if results is None else results
        name_w = max(8, max(len(n) for n in self.class_names))
        cols = ("#GT", "AP50", "AP50_07", "AP")

        def fmt(v: Any) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.{digits}f}"

        head = f"{'class':<{name_w}} " + " ".join(f"{c:>8}" for c in cols)
        lines = [head, "-" * len(head)]
        for n in self.class_names:
            cells = [str(res["num_gt"][n]), fmt(res["per_class_AP50"][n]),
                     fmt(res["per_class_AP50_voc07"][n]), fmt(res["per_class_AP"][n])]
            lines.append(f"{n:<{name_w}} " + " ".join(f"{c:>8}" for c in cells))
        lines.append("-" * len(head))
        total = str(sum(res["num_gt"].values()))
        cells = [total, fmt(res["AP50_voc12"]), fmt(res["AP50_voc07"]), fmt(res["mAP"])]
        lines.append(f"{'mean':<{name_w}} " + " ".join(f"{c:>8}" for c in cells))
        lines.append(f"COCO AP50 {fmt(res['AP50'])}  AP75 {fmt(res['AP75'])}  images {res['num_images']}")
        if "segm_mAP" in res:
            lines.append(f"COCO mask AP {fmt(res['segm_mAP'])}  AP50 {fmt(res['segm_AP50'])}  "
                         f"AP75 {fmt(res['segm_AP75'])}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"DetectionEvaluator(num_classes={self.num_classes}, images={self.num_images}, "
                f"use_difficult={self.use_difficult})")
