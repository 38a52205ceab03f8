"""Segmentation: smp decoders on PCE encoders, the training / inference wrapper, evaluation (mIoU) and the
training-engine adapter (:class:`SegmentationTask`, registered as ``"segmentation"``).

Importing this package registers the PCE backbone presets as segmentation-models-pytorch encoders, so
``smp.create_model("FPN", encoder_name="pce_tiny", encoder_weights=None, classes=21)`` works.
"""
from .encoders import (PCEEncoder, PretrainedWeightsError, create_smp_model, register_smp_encoder,
                       pce_encoder_names, register_smp_encoders)
from .evaluator import SegmentationEvaluator, segmentation_metrics_from_confusion
from .model import SegmentationModel, build_segmentation_model
from .task import SegmentationTask

__all__ = [
    "SegmentationEvaluator", "segmentation_metrics_from_confusion",
    "PCEEncoder", "PretrainedWeightsError", "register_smp_encoder", "create_smp_model", "pce_encoder_names",
    "register_smp_encoders", "SegmentationModel", "build_segmentation_model", "SegmentationTask",
]
