"""Checkpoints written before the package was reorganised (commit 57eaa7e) still load: every model kind has
exactly the state-dict keys and shapes recorded from that code (tests/fixtures/state_dict_keys_v0.json, written by
building the same models with it)."""
import json
from pathlib import Path

import pytest
import torch

import pce
from pce.models.classifier import build_classifier
from pce.tasks.detection.model import build_detector
from pce.tasks.segmentation import build_segmentation_model

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "state_dict_keys_v0.json").read_text())
DEEP = [dict(channels=32, depth=1, patch_size=16, stride=1, layer="dense"),
        dict(channels=64, depth=1, patch_size=8, stride=2, layer="dense"),
        dict(channels=128, depth=1, patch_size=4, stride=2), dict(channels=256, depth=1, patch_size=2, stride=2)]
BUILD = {
    "backbone_pce_tiny": lambda: pce.build_backbone("pce_tiny"),
    "backbone_pce_tiny_context_deep": lambda: pce.build_backbone("pce_tiny", execution="context", stages=DEEP),
    "classifier_pce_fmnist": lambda: build_classifier("pce_fmnist", 10),
    "classifier_gate": lambda: build_classifier("pce_cifar", 10, router="gate", num_experts=3),
    "detector_pce_tiny": lambda: build_detector("pce_tiny", num_classes=5, min_size=128, max_size=128),
    "smp_fpn_pce_tiny": lambda: build_segmentation_model("FPN", "pce_tiny", num_classes=5),
}


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_state_dict_keys_and_shapes_unchanged(kind):
    model = BUILD[kind]()
    now = {n: list(t.shape) for n, t in model.state_dict().items()}
    assert now == RECORDED[kind]
    # a state dict of exactly that layout loads strictly, also with a router override set (phases)
    old = {n: torch.zeros(s) for n, s in RECORDED[kind].items()}
    for bb in pce.iter_backbones(model):
        bb.set_router_override("uniform")
    model.load_state_dict(old, strict=True)
