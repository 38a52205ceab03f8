"""PCE dataset adapters (installed as ``pce.datasets``); importing this registers them all.

Add a module by importing its public names below; registration happens via the
``@DATASETS.register`` / ``@TRANSFORMS.register`` decorators in each module.
"""

from .registry import DATASETS, TRANSFORMS, Registry, build_dataset, build_transform
from .idx import MNIST, FashionMNIST, read_idx
from .cifar import CIFAR10, CIFAR100
from .tiny_imagenet import TinyImageNet
from .digits import Digits
from .transforms import ClassificationTransform, RaiseOneChannel
from .voc_format import VOC_CLASSES, VOC_PALETTE, find_voc_root, parse_voc_xml
from .voc_images import load_index_mask
from .voc import VOCDetection, VOCSegmentation
from .coco import COCODetection, read_coco_json
from .voc_transforms import DetectionTransform, SegmentationTransform
from .collate import SegmentationCollate, detection_collate, segmentation_collate
from .demo_voc import DEMO_CLASSES, demo_voc_is_complete, ensure_demo_voc, make_demo_voc
from . import camelyon  # noqa: E402,F401  (registers camelyon_tiles, camelyon16, camelyon_tile)
from .camelyon import CamelyonTiles, Camelyon16Tiles

__all__ = [
    "DATASETS", "TRANSFORMS", "Registry", "build_dataset", "build_transform",
    "MNIST", "FashionMNIST", "read_idx", "CIFAR10", "CIFAR100", "TinyImageNet", "Digits",
    "ClassificationTransform", "RaiseOneChannel",
    "COCODetection", "read_coco_json",
    "VOC_CLASSES", "VOC_PALETTE", "VOCDetection", "VOCSegmentation", "find_voc_root", "load_index_mask",
    "parse_voc_xml", "DetectionTransform", "SegmentationTransform",
    "SegmentationCollate", "detection_collate", "segmentation_collate",
    "DEMO_CLASSES", "demo_voc_is_complete", "ensure_demo_voc", "make_demo_voc",
    "camelyon", "CamelyonTiles", "Camelyon16Tiles",
]
