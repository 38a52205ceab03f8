"""Detection: Faster R-CNN + FPN on PCE backbones, evaluation (COCO-style and VOC AP) and the training-engine
adapter."""
from .ap_voc import box_iou_xyxy, voc_ap
from .evaluator import DetectionEvaluator
from .model import PCEFasterRCNN, PCEFPNBackbone, build_detector, default_anchor_sizes
from .task import DetectionTask

__all__ = ["DetectionEvaluator", "box_iou_xyxy", "voc_ap", "PCEFasterRCNN", "PCEFPNBackbone", "build_detector",
           "default_anchor_sizes", "DetectionTask"]
