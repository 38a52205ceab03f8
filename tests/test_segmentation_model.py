"""smp integration of the PCE encoders and the segmentation model wrapper (tiny CPU inputs)."""
import copy

import pytest
import torch

import segmentation_models_pytorch as smp

import pce
from pce.moe.routers import GateRouter
from pce.tasks.segmentation import (PCEEncoder, PretrainedWeightsError, SegmentationModel, build_segmentation_model,
                                    create_smp_model, pce_encoder_names, register_smp_encoder)
from pce.tasks.segmentation.model import _window_starts

ARCHS = ["FPN", "Unet", "DeepLabV3Plus"]
ENCODERS = ["pce_tiny", "dense_tiny"]
SIZES = [(64, 64), (96, 64), (70, 50)]



def routed_losses(model, images, masks, weights=None, **kw):
    """The model's losses plus ``loss_router`` from the recorded routing (what the segmentation task adds)."""
    with pce.record_routing(model) as rec:
        out = model.losses(images, masks, **kw)
    losses = out[0] if isinstance(out, tuple) else out
    losses["loss_router"] = pce.router_loss(rec.results, weights)
    return (out, rec) if not isinstance(out, tuple) else ((losses, out[1]), rec)


def router_params(model):
    return [p for l in model.backbone.pce_layers() for p in l.router.parameters() if p.requires_grad]


def test_registered_names():
    names = set(pce_encoder_names())
    assert names == {f"{k}_{s}" for k in ("pce", "dense") for s in ("tiny", "small", "base")}
    assert names <= set(smp.encoders.get_encoder_names())
    assert "pce_cifar" not in smp.encoders.encoders  # strides 1..8: not an smp encoder
    assert all(smp.encoders.encoders[n]["encoder"] is PCEEncoder for n in names)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_smp_create_model_and_wrapper_sizes(arch, encoder):
    net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=5)
    assert isinstance(net.encoder, PCEEncoder)
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5, 64, 64)
    model = build_segmentation_model(arch, encoder, num_classes=5)
    assert model.size_divisibility == (16 if arch == "DeepLabV3Plus" else 32)
    for h, w in SIZES:
        with pce.record_routing(model) as rec:
            logits = model(torch.randn(2, 3, h, w))
        assert logits.shape == (2, 5, h, w)
        assert torch.isfinite(logits).all()
        assert len(rec) == (4 if encoder.startswith("pce") else 0)


def test_encoder_features_strides_and_channels():
    enc = PCEEncoder("pce_tiny")
    x = torch.randn(2, 3, 64, 96)
    with pce.record_routing(enc) as rec:
        feats = enc(x)
    assert feats[0] is x
    assert [f.shape[1] for f in feats] == enc.out_channels == [3, 32, 32, 64, 128, 256]
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // s, 96 // s) for s in (1, 2, 4, 8, 16, 32)]
    assert enc.strides == [1, 2, 4, 8, 16, 32]
    assert len(rec) == 4
    with pce.record_routing(enc) as again:
        enc(x)
    assert len(again) == 4 and len(rec) == 4  # each block sees its own forwards only
    shallow = PCEEncoder("pce_tiny", depth=3)
    assert len(shallow.backbone.stages) == 2 and len(shallow(x)) == 4
    with pytest.raises(ValueError, match="depth"):
        PCEEncoder("pce_tiny", depth=2)


@pytest.mark.parametrize("os_, strides, patches", [(16, [4, 8, 16, 16], [16, 8, 4, 4]),
                                                    (8, [4, 8, 8, 8], [16, 8, 8, 8])])
def test_deeplabv3plus_output_stride(os_, strides, patches):
    model = build_segmentation_model("DeepLabV3Plus", "pce_tiny", num_classes=3, encoder_output_stride=os_)
    bb = model.backbone
    assert [f["stride"] for f in bb.feature_info] == strides
    assert [l.patch_size for l in bb.pce_layers()] == patches  # same patch grid in image pixels
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="output_stride"):
        model.encoder.make_dilated(8 if os_ == 16 else 16)


def test_sliding_window_equals_whole_when_window_covers_image():
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=4)
    x = torch.randn(2, 3, 70, 50)
    model.train()
    whole = model.predict(x)
    assert model.training  # mode restored
    for window in (128, (70, 50)):
        slide = model.predict(x, mode="slide", window=window, stride=16)
        assert torch.equal(slide, whole)
    logits_whole = model.predict_logits(x)
    assert torch.equal(model.predict_logits(x, mode="slide", window=(80, 80)), logits_whole)
    assert whole.shape == (2, 70, 50) and whole.dtype == torch.int64


@pytest.mark.parametrize("arch", ["FPN", "DeepLabV3Plus"])
def test_sliding_window_overlap_shapes(arch):
    model = build_segmentation_model(arch, "pce_tiny", num_classes=4)
    for h, w in [(70, 50), (96, 64)]:
        x = torch.randn(2, 3, h, w)
        labels = model.predict(x, mode="slide", window=48, stride=32)
        assert labels.shape == (2, h, w) and labels.dtype == torch.int64
        assert 0 <= labels.min() and labels.max() < 4
        logits = model.predict_logits(x, mode="slide", window=(40, 32))  # default stride: 2/3 of the window
        assert logits.shape == (2, 4, h, w) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="window"):
        model.predict(x, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        model.predict(x, mode="tiles")


def test_window_starts_cover_everything():
    assert _window_starts(70, 48, 32) == [0, 22]
    assert _window_starts(96, 48, 32) == [0, 32, 48]
    assert _window_starts(30, 48, 32) == [0]
    for size, win, stride in [(70, 48, 32), (101, 33, 7), (64, 64, 10)]:
        covered = torch.zeros(size)
        for s in _window_starts(size, win, stride):
            assert s + win <= size
            covered[s:s + win] = 1
        assert covered.all()


def _grad_norm(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def test_router_gradient_through_router_loss_and_ce():
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=3)
    x, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    params = router_params(model)
    assert params
    losses, _ = routed_losses(model, x, masks, {"entropy": 0.1, "balance": 0.01, "z": 0.001})
    assert set(losses) == {"loss_ce", "loss_router"}
    losses["loss_router"].backward(retain_graph=True)
    assert _grad_norm(params) > 0
    model.zero_grad(set_to_none=True)
    losses["loss_ce"].backward()
    assert _grad_norm(params) > 0


def test_dense_twin_has_zero_router_loss():
    model = build_segmentation_model("Unet", "dense_tiny", num_classes=3)
    losses, rec = routed_losses(model, torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    assert rec.records == [] and float(losses["loss_router"]) == 0.0


def test_loss_options_and_ignore_index():
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=3, dice_weight=0.5, lovasz_weight=0.5,
                                     class_weights=[1.0, 2.0, 0.5])
    x = torch.randn(2, 3, 70, 50)
    masks = torch.randint(0, 3, (2, 70, 50))
    masks[:, :5] = 255
    (losses, logits), _ = routed_losses(model, x, masks, return_logits=True)
    assert set(losses) == {"loss_ce", "loss_dice", "loss_lovasz", "loss_router"}
    assert logits.shape == (2, 3, 70, 50)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    ignored = model.losses(x, torch.full((2, 70, 50), 255))
    assert float(ignored["loss_ce"].detach()) == 0.0  # not NaN
    with pytest.raises(ValueError, match="masks"):
        model.losses(x, masks[:, :64])


def test_encoder_overrides():
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=3,
                                     encoder_overrides={"router": "gate", "num_experts": 2, "top_k": 1})
    layers = list(model.backbone.pce_layers())
    assert layers and all(isinstance(l.router, GateRouter) and l.num_experts == 2 for l in layers)
    routed_losses(model, torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))[0]["loss_router"].backward()
    assert _grad_norm(router_params(model)) > 0
    name = register_smp_encoder("pce_tiny_e3", "pce_tiny", num_experts=3)  # for any plain smp constructor
    net = smp.create_model("Unet", encoder_name=name, encoder_weights=None, classes=2)
    assert {l.num_experts for l in net.encoder.backbone.pce_layers()} == {3}
    with pytest.raises(ValueError, match="already registered"):
        register_smp_encoder("pce_tiny_e3", "pce_tiny", num_experts=5)
    net = smp.create_model("Unet", encoder_name="pce_tiny", encoder_weights=None, classes=2)  # no leak
    assert {l.num_experts for l in net.encoder.backbone.pce_layers()} == {4}
    with pytest.raises(TypeError, match="unknown backbone option"):
        build_segmentation_model("FPN", "pce_tiny", encoder_overrides={"nope": 1})
    with pytest.raises(TypeError, match="in_channels"):
        build_segmentation_model("FPN", "pce_tiny", encoder_overrides={"in_chans": 1})
    with pytest.raises(TypeError, match="PCE encoders"):
        create_smp_model("FPN", "resnet18", {"router": "gate"})


def test_in_channels_and_phase_controls():
    model = build_segmentation_model("Unet", "pce_tiny", num_classes=2, in_channels=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2, 64, 64)
    assert isinstance(model.backbone, pce.PCEBackbone)
    model.backbone.set_router_override("uniform")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    model.backbone.set_router_override(None)


def test_pretrained_weights_raise_without_network(monkeypatch):
    import segmentation_models_pytorch.encoders as smp_encoders

    def no_download(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(smp_encoders, "hf_hub_download", no_download)
    for kwargs in ({"encoder_weights": "imagenet"}, {}):  # smp's default is "imagenet"
        with pytest.raises(PretrainedWeightsError, match="no pretrained weights"):
            smp.create_model("FPN", encoder_name="pce_tiny", classes=2, **kwargs)
    with pytest.raises(KeyError):
        build_segmentation_model("FPN", "dense_tiny", num_classes=2, encoder_weights="imagenet")
    with pytest.raises(ValueError):
        build_segmentation_model("FPN", "pce_tiny", num_classes=2, encoder_weights="ssl")


def test_builder_rejects_conflicting_options():
    with pytest.raises(TypeError, match="num_classes"):
        build_segmentation_model("FPN", "pce_tiny", classes=3)
    with pytest.raises(TypeError, match="decoder_channels"):  # an Unet / DeepLab option: smp would drop it
        build_segmentation_model("FPN", "pce_tiny", num_classes=3, decoder_channels=64)
    with pytest.raises(ValueError, match="activation"):
        build_segmentation_model("FPN", "pce_tiny", num_classes=3, activation="softmax2d")


def test_deepcopy_after_a_training_forward():
    """EMA copies (AveragedModel deep-copies) carry no routing of the last forward: none is stored."""
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=3)
    _, rec = routed_losses(model, torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64)))
    assert len(rec) == 4
    clone = copy.deepcopy(model)
    assert not any(isinstance(v, (list, pce.RoutingResult)) and v and isinstance(v[0] if isinstance(v, list) else v,
                                                                                  pce.RoutingResult)
                   for m in clone.modules() for v in vars(m).values())
    assert clone.predict(torch.randn(1, 3, 40, 40)).shape == (1, 40, 40)


def test_few_steps_lower_the_loss():
    images = torch.zeros(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    for i, (y, x) in enumerate([(8, 12), (30, 24)]):
        images[i, :, y:y + 24, x:x + 24] = 1.0
        masks[i, y:y + 24, x:x + 24] = 1
    images = images + 0.05 * torch.randn_like(images)
    model = build_segmentation_model("FPN", "pce_tiny", num_classes=2)
    assert isinstance(model, SegmentationModel)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        losses, _ = routed_losses(model, images, masks)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    assert history[-1] < 0.7 * history[0], history
