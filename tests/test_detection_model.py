"""Faster R-CNN + FPN on PCE / dense backbones (pce.tasks.detection.model) and the drawing helpers
(pce.tasks.visualize). Tiny images (96-128 px), batch 2, a handful of steps."""
from __future__ import annotations

import math

import pytest
import torch

import pce
from pce.engine.phases import find_backbones
from pce.tasks.detection import PCEFasterRCNN, PCEFPNBackbone, build_detector, default_anchor_sizes
from pce.tasks.visualize import draw_detections, overlay_mask, palette_colors, save_png, to_uint8_image

TV_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
SMALL = dict(num_classes=3, fpn_channels=32, representation_size=64, min_size=96, max_size=128)



def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 128, 96, generator=g)]
    # a bright square on each image so the data is not pure noise
    images[0][:, 20:70, 30:90] = 0.9
    images[1][:, 40:110, 10:60] = 0.1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 40.0, 60.0, 110.0], [60.0, 5.0, 90.0, 30.0]]),
                "labels": torch.tensor([2, 1])}]
    return images, targets


def _routed(model, images, targets=None, weights=None):
    """Detector losses plus ``loss_router`` from the recorder (what the detection task adds), and the recorder."""
    with pce.record_routing(model) as rec:
        losses = model(images, targets)
    losses["loss_router"] = pce.router_loss(rec.results, weights)
    return losses, rec


def _router_params(model):
    return [p for layer in model.pce_backbone.pce_layers() for p in layer.router.parameters() if p.requires_grad]


CASES = {
    "pce_tiny": ("pce_tiny", None),
    "dense_tiny": ("dense_tiny", None),
    "pce_tiny_gate3": ("pce_tiny", {"router": "gate", "num_experts": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_and_eval(case):
    name, overrides = CASES[case]
    model = build_detector(name, backbone_overrides=overrides, **SMALL)
    assert isinstance(model, PCEFasterRCNN) and isinstance(model.backbone, PCEFPNBackbone)
    images, targets = _batch()
    model.train()
    assert set(model(images, targets)) == TV_LOSSES  # the detector itself: torchvision's losses only
    losses, rec = _routed(model, images, targets)
    assert set(losses) == TV_LOSSES | {"loss_router"}
    for k, v in losses.items():
        assert v.dim() == 0 and math.isfinite(float(v.detach())), k
    total = sum(losses.values())
    total.backward()
    is_pce = name.startswith("pce")
    assert (len(rec) > 0) == is_pce
    if is_pce:
        assert float(losses["loss_router"].detach()) > 0
        params = _router_params(model)
        assert params, "the PCE backbone has trainable router parameters"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    else:
        assert float(losses["loss_router"].detach()) == 0.0
        assert not list(model.pce_backbone.pce_layers())

    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert isinstance(dets, list) and len(dets) == 2
    assert sum(len(d["boxes"]) for d in dets) > 0
    for img, d in zip(images, dets):
        H, W = img.shape[-2:]
        assert set(d) >= {"boxes", "labels", "scores"}
        b = d["boxes"]
        assert b.shape[1] == 4 and len(b) == len(d["labels"]) == len(d["scores"])
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert ((d["labels"] >= 1) & (d["labels"] < 3)).all()
        assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()


def test_anchors_and_featmap_names_follow_feature_info():
    model = build_detector("pce_tiny", **SMALL)
    info = model.pce_backbone.feature_info
    names = [str(i) for i in range(len(info))]                         # torchvision's BackboneWithFPN names
    strides = [f["stride"] for f in info] + [2 * info[-1]["stride"]]
    ag = model.rpn.anchor_generator
    assert len(ag.sizes) == len(info) + 1 == len(ag.aspect_ratios)      # one per level, pool included
    assert ag.sizes == default_anchor_sizes(strides) == tuple((8 * s,) for s in strides)
    assert all(r == (0.5, 1.0, 2.0) for r in ag.aspect_ratios)
    assert ag.num_anchors_per_location() == [3] * len(ag.sizes)
    assert model.roi_heads.box_roi_pool.featmap_names == names
    assert model.transform.size_divisible == model.pce_backbone.size_divisibility == 32
    x = model.preprocess(_batch()[0])
    assert x.shape[0] == 2 and x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
    feats = model.backbone(x)
    assert list(feats) == names + ["pool"] and [f["name"] for f in model.backbone.feature_info] == list(feats)
    assert [f["stage"] for f in model.backbone.feature_info] == [f["name"] for f in info] + [None]
    for f, (k, v) in zip(model.backbone.feature_info, feats.items()):
        assert v.shape[1] == model.backbone.out_channels == 32
        assert v.shape[-1] == math.ceil(x.shape[-1] / f["stride"])


def test_returned_stages_custom_anchors_and_bad_options():
    model = build_detector("pce_tiny", returned_stages=["stage1", "stage2", "stage3"], anchor_sizes=[16, 32, 64, 128],
                           **SMALL)
    assert len(model.pce_backbone.stages) == 3                          # trailing stage not built
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,))
    model2 = build_detector("dense_tiny", returned_stages=[1, 3], extra_pool=False, anchor_scale=4, **SMALL)
    assert model2.roi_heads.box_roi_pool.featmap_names == ["0", "1"]
    assert [f["stage"] for f in model2.backbone.feature_info] == ["stage2", "stage4"]
    assert model2.rpn.anchor_generator.sizes == ((32,), (128,))
    with pytest.raises(ValueError, match="one entry per feature map"):
        build_detector("pce_tiny", anchor_sizes=[32, 64], **SMALL)
    with pytest.raises(TypeError, match="unknown detector option"):
        build_detector("pce_tiny", not_an_option=1, **SMALL)
    with pytest.raises(ValueError, match="not a backbone feature map"):
        build_detector("pce_tiny", returned_stages=["stage9"], **SMALL)
    with pytest.raises(KeyError, match="unknown router loss"):
        pce.router_loss([], {"bogus": 1.0})


def test_routing_reset_every_forward_and_phase_controls():
    model = build_detector("pce_tiny", **SMALL)
    images, targets = _batch()
    n_layers = len(list(model.pce_backbone.pce_layers()))
    model.eval()
    with torch.no_grad(), pce.record_routing(model) as rec:
        model(images)
    assert len(rec) == n_layers                                          # one result per layer and forward
    assert find_backbones(model) == [model.pce_backbone]                 # what the engine's phase controller uses
    bb = model.pce_backbone                                              # the one owner of the PCE controls
    bb.set_router_override("uniform")
    model.train()
    losses = model(images, targets)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    bb.set_router_override(None)
    bb.set_keys_trainable(True)
    assert all(r.keys.requires_grad for r in bb.key_routers())
    bb.set_keys_trainable(False)
    assert model.init_keys([(images, targets)]) == n_layers              # K-Means from a detection batch
    zero, _ = _routed(model, images, targets, {"balance": 0.0, "z": 0.0})
    assert float(zero["loss_router"].detach()) == 0.0


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_detector("pce_tiny", **SMALL)
    images, targets = _batch()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def total(seed):
        torch.manual_seed(seed)  # fixes the RPN / RoI sampling
        return sum(model(images, targets).values())

    with torch.no_grad():
        before = float(total(123))
    for i in range(6):
        opt.zero_grad()
        total(i).backward()
        opt.step()
    with torch.no_grad():
        after = float(total(123))
    assert after < before, (before, after)


# ------------------------------------------------------------------------------------------ visualize
def test_draw_detections_changes_pixels_on_the_box_only():
    img = torch.full((3, 80, 100), 0.5)
    base = to_uint8_image(img)
    out = draw_detections(img, torch.tensor([[20.0, 30.0, 60.0, 70.0], [0, 0, 10, 10]]), torch.tensor([1, 2]),
                          torch.tensor([0.9, 0.1]), class_names=["circle", "square"], score_thr=0.5, width=2)
    assert out.dtype == torch.uint8 and out.shape == (3, 80, 100)
    assert torch.equal(img, torch.full((3, 80, 100), 0.5))               # input untouched
    changed = (out != base).any(0)
    assert changed[50, 20] and changed[50, 60] and changed[69, 40]       # left, right, bottom edges
    assert not changed[50, 40] and not changed[75, 90]                   # inside / far outside
    assert not changed[5, 5]                                             # low-score box not drawn
    edge = tuple(int(v) for v in out[:, 50, 20])
    assert edge == tuple(int(v) for v in palette_colors(__import__("pce.datasets.voc_format", fromlist=["x"]).VOC_PALETTE)[1])
    empty = draw_detections(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert torch.equal(empty, base)
    with pytest.raises(ValueError, match="same length"):
        draw_detections(img, torch.zeros(2, 4), torch.zeros(1, dtype=torch.long))


def test_overlay_mask_colours(tmp_path):
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.zeros(20, 30, dtype=torch.long)
    mask[5:10, 5:15] = 3
    mask[12:15, 0:4] = 255
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [7, 7, 7] * 252
    out = overlay_mask(img, mask, palette, alpha=1.0)
    assert out[:, 7, 7].tolist() == [128, 128, 0]                        # palette[3]
    assert out[:, 13, 1].tolist() == [7, 7, 7]                           # palette[255]
    assert torch.equal(out[:, mask == 0], img[:, mask == 0])             # background skipped
    assert torch.equal(overlay_mask(img, mask, palette, alpha=0.0), img)
    half = overlay_mask(img.float() / 255, mask, palette, alpha=0.5)
    exp = ((img[:, 7, 7].float() + torch.tensor([128.0, 128.0, 0.0])) / 2)
    assert (half[:, 7, 7].float() - exp).abs().max() <= 1
    from pce.datasets.voc_format import VOC_PALETTE
    full = overlay_mask(img, mask, VOC_PALETTE, alpha=1.0, skip=())
    assert full[:, 0, 0].tolist() == VOC_PALETTE[0:3] and full[:, 7, 7].tolist() == VOC_PALETTE[9:12]
    with pytest.raises(ValueError, match="same size"):
        overlay_mask(img, mask[:10], palette)
    path = save_png(out, tmp_path / "sub" / "o.png")
    from PIL import Image
    import numpy as np
    assert np.array_equal(np.asarray(Image.open(path)), out.permute(1, 2, 0).numpy())


def test_torchvision_detection_contracts_negative_samples_bad_boxes_and_fx():
    """What torchvision's detection tests assert of every detector: images without objects train (box
    losses exactly 0, the rest finite), degenerate boxes are refused, and the backbone's FX feature
    extraction gives the maps the detector's FPN reads."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = build_detector("pce_tiny", **SMALL).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 96)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert set(losses) == TV_LOSSES and all(math.isfinite(float(v.detach())) for v in losses.values())
    assert float(losses["loss_box_reg"].detach()) == 0.0 and float(losses["loss_rpn_box_reg"].detach()) == 0.0
    sum(losses.values()).backward()
    bad = [{"boxes": torch.tensor([[30.0, 20.0, 30.0, 70.0]]), "labels": torch.tensor([1])}] * 2
    with pytest.raises((ValueError, AssertionError), match="positive height and width"):
        model(images, bad)

    body = model.pce_backbone.eval()
    x = torch.randn(1, 3, 96, 128)
    names = [f["module"] for f in body.feature_info]
    fx = create_feature_extractor(body, return_nodes=names)
    with torch.no_grad():
        got, want = fx(x), body(x)
    assert [tuple(v.shape) for v in got.values()] == [tuple(v.shape) for v in want.values()]
    assert all(torch.equal(a, b) for a, b in zip(got.values(), want.values()))
