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
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

try:  # torch is optional for this module; tensors are converted if it is present.
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = ["DetectionEvaluator", "box_iou_xyxy", "voc_ap"]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence

_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes ``a`` [N, 4] and ``b`` [M, 4] (xyxy, continuous) -> [N, M].

    A pair whose union is zero (two degenerate boxes) has IoU 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from cumulative ``recall`` [D] and ``precision`` [D] (detections sorted by score).

    ``use_07_metric=True``: VOC2007 11-point interpolation (mean over recall
    thresholds ``t = 0, 0.1, ..., 1`` of ``max(precision[recall >= t])``, 0 if
    empty).  Otherwise the VOC2010+ area under the monotone precision envelope.
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"recall shape {rec.shape} != precision shape {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for i in range(11):
            t = i / 10.0  # exact decimal thresholds (np.arange(0, 1.1, 0.1) has 0.30000000000000004)
            p = prec[rec >= t]
            ap += (float(p.max()) if p.size else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone (non-increasing) envelope
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _json_scalar(v: Any) -> Any:
    if torch is not None and isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"image_id must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


# --------------------------------------------------------------------------- evaluator


def _make_coco_eval_cls():
    from pycocotools.cocoeval import COCOeval

    class _PlainIoUCOCOeval(COCOeval):
        """COCOeval whose ignore (``iscrowd``) boxes use ordinary IoU."""

        def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools API)
            p = self.params
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
            if len(gt) == 0 and len(dt) == 0:
                return []
            inds = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in inds][: p.maxDets[-1]]
            g = np.array([x["bbox"] for x in gt], dtype=np.float64).reshape(-1, 4)
            d = np.array([x["bbox"] for x in dt], dtype=np.float64).reshape(-1, 4)
            g[:, 2:] += g[:, :2]  # xywh -> xyxy
            d[:, 2:] += d[:, :2]
            return box_iou_xyxy(d, g)

    return _PlainIoUCOCOeval


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

    def _check_labels(self, labels: np.ndarray, where: str) -> np.ndarray:
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.equal(np.mod(labels, 1), 0)):
                bad = labels[np.mod(labels, 1) != 0][0]
                raise ValueError(f"{where}: labels must be integers, got {bad!r}")
        labels = labels.astype(np.int64)
        bad = (labels < 1) | (labels > self.num_classes)
        if np.any(bad):
            raise ValueError(
                f"{where}: label {int(labels[bad][0])} out of range 1..{self.num_classes} "
                f"(0 is background and must not appear)"
            )
        return labels

    @staticmethod
    def _check_boxes(boxes: ArrayLike, where: str) -> np.ndarray:
        b = _to_numpy(boxes).astype(np.float64)
        if b.size == 0:
            return b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{where}: boxes must have shape [N, 4] (xyxy), got {tuple(b.shape)}")
        if not np.all(np.isfinite(b)):
            raise ValueError(f"{where}: boxes contain non-finite values (row {int(np.nonzero(~np.isfinite(b))[0][0])})")
        bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if np.any(bad):
            i = int(np.nonzero(bad)[0][0])
            raise ValueError(f"{where}: box {i} = {b[i].tolist()} has x2 < x1 or y2 < y1; boxes must be xyxy")
        return b

    def _record(self, pred: Mapping[str, ArrayLike], tgt: Mapping[str, ArrayLike], i: int) -> Dict[str, Any]:
        for key in ("boxes", "scores", "labels"):
            if key not in pred:
                raise KeyError(f"predictions[{i}] has no {key!r} (keys: {sorted(pred)})")
        for key in ("boxes", "labels"):
            if key not in tgt:
                raise KeyError(f"targets[{i}] has no {key!r} (keys: {sorted(tgt)})")
        pb = self._check_boxes(pred["boxes"], f"predictions[{i}]")
        ps = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        pl = self._check_labels(_to_numpy(pred["labels"]).reshape(-1), f"predictions[{i}]")
        if not (len(pb) == len(ps) == len(pl)):
            raise ValueError(
                f"predictions[{i}]: boxes {len(pb)}, scores {len(ps)} and labels {len(pl)} differ in length"
            )
        if not np.all(np.isfinite(ps)):
            raise ValueError(f"predictions[{i}]: scores contain non-finite values")
        gb = self._check_boxes(tgt["boxes"], f"targets[{i}]")
        gl = self._check_labels(_to_numpy(tgt["labels"]).reshape(-1), f"targets[{i}]")
        if len(gb) != len(gl):
            raise ValueError(f"targets[{i}]: boxes {len(gb)} and labels {len(gl)} differ in length")
        if tgt.get("difficult") is not None:
            gd = _to_numpy(tgt["difficult"]).reshape(-1).astype(bool)
            if len(gd) != len(gl):
                raise ValueError(f"targets[{i}]: difficult has {len(gd)} entries for {len(gl)} boxes")
        else:
            gd = np.zeros(len(gl), dtype=bool)
        image_id = _json_scalar(tgt.get("image_id"))
        return {
            "image_id": image_id,
            "pred_boxes": pb,
            "pred_scores": ps,
            "pred_labels": pl,
            "gt_boxes": gb,
            "gt_labels": gl,
            "gt_difficult": gd,
        }

    def update(self, predictions: Sequence[Mapping[str, ArrayLike]], targets: Sequence[Mapping[str, ArrayLike]]) -> None:
        """Add one batch: ``predictions`` / ``targets`` are lists with one dict per image.

        predictions[i]: "boxes" float [N, 4] xyxy absolute, "scores" [N], "labels" int [N] in 1..C.
        targets[i]: "boxes" [M, 4], "labels" [M], optional "difficult" bool [M], optional "image_id".
        Tensors (any device) or numpy arrays.
        """
        if isinstance(predictions, Mapping) or isinstance(targets, Mapping):
            raise TypeError("predictions and targets must be lists of per-image dicts, not a single dict")
        if len(predictions) != len(targets):
            raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets")
        self._images.extend(self._record(p, t, i) for i, (p, t) in enumerate(zip(predictions, targets)))

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

    # ------------------------------------------------------------------ VOC

    def _voc_class_ap(self, cls: int) -> Dict[str, Any]:
        """VOC AP at IoU 0.5 for label ``cls``: dict(ap07, ap12, npos, num_det)."""
        det_img, det_row, det_score = [], [], []
        ious: List[np.ndarray] = []
        gt_diff: List[np.ndarray] = []
        npos = 0
        for i, r in enumerate(self._images):
            gm = r["gt_labels"] == cls
            dm = r["pred_labels"] == cls
            diff = np.zeros(int(gm.sum()), dtype=bool) if self.use_difficult else r["gt_difficult"][gm]
            npos += int((~diff).sum())
            gt_diff.append(diff)
            ious.append(box_iou_xyxy(r["pred_boxes"][dm], r["gt_boxes"][gm]))
            n = int(dm.sum())
            det_img.extend([i] * n)
            det_row.extend(range(n))
            det_score.append(r["pred_scores"][dm])
        scores = np.concatenate(det_score) if det_score else np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        matched = [np.zeros(len(d), dtype=bool) for d in gt_diff]
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        keep = np.ones(len(order), dtype=bool)
        for k, j in enumerate(order):
            i, row = det_img[j], det_row[j]
            iou = ious[i]
            if iou.shape[1] == 0:
                fp[k] = 1
                continue
            g = int(np.argmax(iou[row]))
            if iou[row, g] >= 0.5:
                if gt_diff[i][g]:
                    keep[k] = False  # matched to a difficult box: neither TP nor FP
                elif not matched[i][g]:
                    tp[k] = 1
                    matched[i][g] = True
                else:
                    fp[k] = 1  # duplicate detection
            else:
                fp[k] = 1
        if npos == 0:
            return {"ap07": math.nan, "ap12": math.nan, "npos": 0, "num_det": int(keep.sum())}
        tp_c = np.cumsum(tp[keep])
        fp_c = np.cumsum(fp[keep])
        rec = tp_c / npos
        prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).tiny)
        return {
            "ap07": voc_ap(rec, prec, use_07_metric=True),
            "ap12": voc_ap(rec, prec, use_07_metric=False),
            "npos": npos,
            "num_det": int(keep.sum()),
        }

    # ------------------------------------------------------------------ COCO

    def _coco_precision(self) -> Optional[np.ndarray]:
        """pycocotools precision array [T, 101, C] (-1 for classes without GT), or None without detections."""
        from pycocotools.coco import COCO

        images, annotations, results = [], [], []
        ann_id = 0
        for idx, r in enumerate(self._images):
            img_id = idx + 1  # internal ids: user image_ids may be strings or collide across ranks
            images.append({"id": img_id})
            for box, lab, diff in zip(r["gt_boxes"], r["gt_labels"], r["gt_difficult"]):
                ann_id += 1
                x1, y1, x2, y2 = (float(v) for v in box)
                crowd = int(bool(diff) and not self.use_difficult)
                annotations.append(
                    {
                        "id": ann_id,  # pycocotools requires ids > 0 (0 means "unmatched")
                        "image_id": img_id,
                        "category_id": int(lab),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": crowd,
                    }
                )
            for box, s, lab in zip(r["pred_boxes"], r["pred_scores"], r["pred_labels"]):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append(
                    {"image_id": img_id, "category_id": int(lab), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
                )
        if not results:
            return None  # loadRes([]) raises IndexError
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            gt = COCO()
            gt.dataset = {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c + 1, "name": n} for c, n in enumerate(self.class_names)],
            }
            gt.createIndex()
            dt = gt.loadRes(results)
            ev = _make_coco_eval_cls()(gt, dt, iouType="bbox")
            ev.params.imgIds = [im["id"] for im in images]
            ev.params.catIds = list(range(1, self.num_classes + 1))
            ev.params.iouThrs = self.iou_thresholds.copy()
            ev.params.maxDets = [self.max_dets]
            ev.params.areaRng = [[0.0, 1e5**2]]
            ev.params.areaRngLbl = ["all"]
            ev.evaluate()
            ev.accumulate()
        return ev.eval["precision"][:, :, :, 0, 0]

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
        "num_gt" ({name: positives}) and "num_images".  Excluded classes -> nan.
        """
        nan = math.nan
        voc = [self._voc_class_ap(c) for c in range(1, self.num_classes + 1)]
        ap07 = np.array([v["ap07"] for v in voc], dtype=np.float64)
        ap12 = np.array([v["ap12"] for v in voc], dtype=np.float64)

        has_pos = self._has_positive()
        prec = self._coco_precision()
        T = len(self.iou_thresholds)
        if prec is None:  # no detection at all: AP 0 for every class with positives
            per_thr_cls = np.where(has_pos[None, :], 0.0, nan) * np.ones((T, 1))
        else:
            valid = prec > -1  # [T, R, C]; a class is either all valid or all -1
            summed = np.where(valid, prec, 0.0).sum(axis=1)
            count = valid.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_thr_cls = np.where(count > 0, summed / np.maximum(count, 1), nan)  # [T, C]

        def _mean(x: np.ndarray) -> float:
            x = x[~np.isnan(x)]
            return float(x.mean()) if x.size else nan

        def _at(thr: float) -> float:
            hit = np.nonzero(np.isclose(self.iou_thresholds, thr))[0]
            return _mean(per_thr_cls[hit[0]]) if hit.size else nan

        coco_cls = np.array([_mean(per_thr_cls[:, c]) for c in range(self.num_classes)])
        names = self.class_names
        return {
            "mAP": _mean(per_thr_cls.ravel()),
            "AP50": _at(0.5),
            "AP75": _at(0.75),
            "AP50_voc07": _mean(ap07),
            "AP50_voc12": _mean(ap12),
            "per_class_AP50": {n: float(v) for n, v in zip(names, ap12)},
            "per_class_AP50_voc07": {n: float(v) for n, v in zip(names, ap07)},
            "per_class_AP": {n: float(v) for n, v in zip(names, coco_cls)},
            "num_gt": {n: int(v["npos"]) for n, v in zip(names, voc)},
            "num_images": self.num_images,
        }

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
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"DetectionEvaluator(num_classes={self.num_classes}, images={self.num_images}, "
                f"use_difficult={self.use_difficult})")
