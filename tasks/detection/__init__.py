"""Detection: evaluation (COCO-style and VOC AP)."""
from .evaluator import DetectionEvaluator, box_iou_xyxy, voc_ap

__all__ = ["DetectionEvaluator", "box_iou_xyxy", "voc_ap"]
