"""Patch footprints in image pixels (issue #26): ``patch_footprints`` against the strides and patch sizes of each
preset worked out by hand, against the patch grids a forward really routes, and the shrinking presets."""
from __future__ import annotations

import warnings

import pytest
import torch

from pce.models.presets import backbone_spec, build_backbone, list_backbones, patch_footprints
from pce.moe.recorder import record_routing

# (preset, feature strides, patch sides) worked out by hand from the preset table in pce/models/presets.py
HAND = {
    # stem 4, stage strides 1, 2, 2, 2 -> 4, 8, 16, 32; patches 16, 8, 4, 2 -> 64 px each
    "pce_tiny": ([4, 8, 16, 32], [16, 8, 4, 2], [64, 64, 64, 64]),
    "pce_small": ([4, 8, 16, 32], [16, 8, 4, 2], [64, 64, 64, 64]),
    "pce_base": ([4, 8, 16, 32], [16, 8, 4, 2], [64, 64, 64, 64]),
    # stem 1, stage strides 2, 2, 2 -> 2, 4, 8; patches 7, 4, 2 -> 14, 16, 16 px; cifar 8, 4, 2 -> 16 px each
    "pce_fmnist": ([2, 4, 8], [7, 4, 2], [14, 16, 16]),
    "pce_cifar": ([2, 4, 8], [8, 4, 2], [16, 16, 16]),
    # stem 4, stage strides 1, 2, 1, 1 -> 4, 8, 8, 8; patches 16, 4, 2, 1 -> 64, 32, 16, 8 px
    "pce_tiny_shrink": ([4, 8, 8, 8], [16, 4, 2, 1], [64, 32, 16, 8]),
}
# the shrinking variant of pce_fmnist, as a config's backbone_overrides (the comment in pce/models/presets.py)
FMNIST_SHRINK = dict(stages=[dict(channels=48, patch_size=7, stride=2), dict(channels=48, patch_size=4, stride=1),
                             dict(channels=48, patch_size=2, stride=1)])


def _spec(name):
    return backbone_spec("pce_fmnist", **FMNIST_SHRINK) if name == "pce_fmnist_shrink" else name


def _build(name, **kw):
    if name == "pce_fmnist_shrink":
        return build_backbone("pce_fmnist", **FMNIST_SHRINK, **kw)
    return build_backbone(name, **kw)


@pytest.mark.parametrize("name", sorted(HAND))
def test_footprints_equal_the_hand_computation(name):
    strides, patches, footprints = HAND[name]
    rows = patch_footprints(name)
    assert [r["stride"] for r in rows] == strides
    assert [r["patch_size"] for r in rows] == patches
    assert [r["footprint"] for r in rows] == footprints
    assert [r["stage"] for r in rows] == list(range(1, len(strides) + 1))
    dense = patch_footprints(name.replace("pce_", "dense_"))
    assert [r["footprint"] for r in dense] == footprints and {r["kind"] for r in dense} == {"dense"}


def test_every_pce_preset_is_described():
    assert set(list_backbones("pce_")) == set(HAND)


def test_the_fmnist_override_shrinks_by_hand():
    # stem 1, stage strides 2, 1, 1 -> 2, 2, 2; patches 7, 4, 2 -> 14, 8, 4 px
    rows = patch_footprints(_spec("pce_fmnist_shrink"))
    assert [(r["stride"], r["patch_size"], r["footprint"]) for r in rows] == [(2, 7, 14), (2, 4, 8), (2, 2, 4)]


@pytest.mark.parametrize("name, side", [("pce_tiny", 256), ("pce_tiny_shrink", 256), ("pce_fmnist", 28),
                                        ("pce_fmnist_shrink", 28)])
def test_footprints_are_what_a_forward_routes(name, side):
    """The maps and grids ``patch_footprints(name, side)`` predicts are those the layers record; on an image the
    grids tile exactly (256 px), one patch covers the nominal footprint."""
    model = _build(name, execution="sparse").eval()
    x = torch.randn(1, 1 if "fmnist" in name else 3, side, side)
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    rows = patch_footprints(_spec(name), side)
    assert [r.map_size[0] for r in rec.results] == [r["map"] for r in rows]
    assert [r.grid[0] for r in rec.results] == [r["grid"] for r in rows]
    assert [side / r.grid[0] for r in rec.results] == [r["image_px"] for r in rows]
    if side == 256:
        assert [side // r.grid[0] for r in rec.results] == [r["footprint"] for r in rows]


def test_footprints_on_28_pixel_images_by_hand():
    # pce_fmnist: maps 14, 7, 4 (ceil halves); patches 7, 4, 2: 14 / 7 = 2, 7 -> padded to 8 / 4 = 2, 4 / 2 = 2
    rows = patch_footprints("pce_fmnist", 28)
    assert [(r["map"], r["grid"], r["image_px"]) for r in rows] == [(14, 2, 14.0), (7, 2, 14.0), (4, 2, 14.0)]
    # pce_fmnist_shrink: maps 14, 14, 14; 14 / 7 = 2; 14 -> padded to 16 / 4 = 4; 14 / 2 = 7
    rows = patch_footprints(_spec("pce_fmnist_shrink"), 28)
    assert [(r["map"], r["grid"], r["image_px"]) for r in rows] == [(14, 2, 14.0), (14, 4, 7.0), (14, 7, 4.0)]


@pytest.mark.parametrize("name, parent, side", [("pce_tiny_shrink", "pce_tiny", 128),
                                                ("pce_fmnist_shrink", "pce_fmnist", 28)])
def test_shrinking_presets_cost_about_what_their_parents_cost(name, parent, side):
    from pce.models.flops import count_flops

    warnings.filterwarnings("ignore")
    chans = 1 if "fmnist" in name else 3
    flops = {}
    for n in (name, parent):  # one expert per patch: the active FLOPs of top-1 routing
        model = _build(n, num_experts=1, execution="dense").eval()
        flops[n] = count_flops(model, torch.randn(1, chans, side, side))["total"]
    assert 0.75 < flops[name] / flops[parent] < 1.1, flops
    footprints = [r["footprint"] for r in patch_footprints(_spec(name))]
    assert all(b < a for a, b in zip(footprints, footprints[1:]))  # strictly shrinking with depth
