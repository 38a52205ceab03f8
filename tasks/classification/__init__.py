"""Classification: the PCE classifier (backbone -> SPP -> FC) and its metrics."""
from pce.classifier import PCEClassifier, build_classifier

from .metrics import ClassificationEvaluator, topk_accuracy

__all__ = ["PCEClassifier", "build_classifier", "ClassificationEvaluator", "topk_accuracy"]
