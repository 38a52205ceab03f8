"""Classification: the PCE classifier (backbone -> SPP -> FC), its metrics and the training-engine adapter."""
from pce.models.classifier import PCEClassifier, build_classifier

from .metrics import ClassificationEvaluator, topk_accuracy
from .task import ClassificationTask

__all__ = ["PCEClassifier", "build_classifier", "ClassificationEvaluator", "topk_accuracy", "ClassificationTask"]
