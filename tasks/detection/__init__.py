"""Detection: torchvision's Faster R-CNN, Mask R-CNN, RetinaNet and FCOS + FPN on PCE backbones, evaluation
(COCO-style box / mask AP and VOC AP) and the training-engine adapter."""
from .ap_voc import box_iou_xyxy, voc_ap
from .evaluator import DetectionEvaluator
from .model import (DETECTION_HEADS, PCEDetectorMixin, PCEFasterRCNN, PCEFCOS, PCEFPNBackbone, PCEMaskRCNN,
                    PCERetinaNet, build_detector, default_anchor_sizes)
from .task import DetectionTask

__all__ = ["DetectionEvaluator", "box_iou_xyxy", "voc_ap", "PCEFasterRCNN", "PCEMaskRCNN", "PCERetinaNet", "PCEFCOS",
           "PCEDetectorMixin", "PCEFPNBackbone", "DETECTION_HEADS", "build_detector", "default_anchor_sizes",
           "DetectionTask"]
