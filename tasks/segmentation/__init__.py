"""Segmentation: evaluation (confusion-matrix mIoU)."""
from .evaluator import SegmentationEvaluator, segmentation_metrics_from_confusion

__all__ = ["SegmentationEvaluator", "segmentation_metrics_from_confusion"]
