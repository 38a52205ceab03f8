"""timm's model contract (what timm's own tests/test_models.py asserts of its models) on every PCE preset and
dense twin built with ``timm.create_model``: forward / backward, pretrained cfgs without weights, the head API
(``forward_head``, ``reset_classifier``, ``num_classes=0``), ``forward_intermediates``,
``prune_intermediate_layers``, ``features_only`` with each ``feature_cls``, ``output_stride`` and smp's
``tu-pce_tiny`` encoder. Numbers are compared with independent computations (SPP by hand, a seeded twin)."""
import copy
import functools
import math

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo, get_pretrained_cfg
from torch import nn

import pce
from pce.models.presets import backbone_config, list_backbones

PRESETS = list_backbones()
FEATURE_CLS = [None, "list", "dict", "getter", "hook", "fx"]
#: the presets whose build is slow (~1 s: 60M / 120M parameters to initialise on one CPU thread): the
#: feature_cls / output_stride matrices run on them for the default wrapper, timm's getter and stride 16 only
SLOW = {"pce_small", "pce_base"}
CFG_KEYS = {"input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "pool_size",
            "num_classes"}


def _small(name, batch=2):
    """A cheap input: the cfg size for the 28 / 32 px presets, 64x64 (every map divides) for the others."""
    c, h, w = get_pretrained_cfg(name).input_size
    s = h if h <= 32 else 64
    return torch.randn(batch, c, s, s)


def _stages(name):
    return backbone_config(name)["stages"]


@functools.lru_cache(maxsize=None)
def _reference(name):
    """``create_model(name, num_classes=0)`` built from seed 0: the same backbone weights as any other seed-0
    build of ``name`` (the head is built after the backbone)."""
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0).eval()


def _seeded(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


# -- registration and pretrained cfgs ------------------------------------------------------------------------
def test_every_preset_is_registered_and_none_has_weights():
    assert set(PRESETS) <= set(timm.list_models())
    assert not set(PRESETS) & set(timm.list_models(pretrained=True))
    for name in PRESETS:
        cfg = get_pretrained_cfg(name)
        assert not cfg.has_weights and not cfg.url and not cfg.hf_hub_id and not cfg.file
        with pytest.raises(ValueError, match="no pretrained weights"):
            timm.create_model(name, pretrained=True)


# -- one default build: cfg, backward, head API --------------------------------------------------------------
def _check_pretrained_cfg(name, model):
    """timm: the cfg describes the input, first_conv / classifier name real modules, and forward_features at
    input_size is the unpooled map of spatial size pool_size."""
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and CFG_KEYS <= set(cfg) and cfg["architecture"] == name
    in_chans = backbone_config(name)["in_chans"]
    assert cfg["input_size"][0] == in_chans == model.in_chans == len(cfg["mean"]) == len(cfg["std"])
    state = model.state_dict()
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == in_chans and cfg["first_conv"] + ".weight" in state
    head = model.get_submodule(cfg["classifier"])
    assert isinstance(head, nn.Linear) and cfg["classifier"] + ".weight" in state
    assert head.out_features == cfg["num_classes"] == model.num_classes and head.in_features == model.head_hidden_size
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == cfg["input_size"] and data["mean"] == cfg["mean"] and data["std"] == cfg["std"]
    with torch.no_grad():
        feat = model.eval().forward_features(torch.randn(1, *cfg["input_size"]))
    assert feat.shape == (1, model.num_features, *cfg["pool_size"])
    assert model.num_features == _stages(name)[-1]["channels"] == model.feature_info[-1]["num_chs"]


def _unused_expert_params(model, records):
    """Names of the expert weights of experts no patch was routed to (top-1 on a small batch)."""
    unused = set()
    for layer_name, result in records:
        layer_name = layer_name[: -len(".router")] if layer_name.endswith(".router") else layer_name
        used = (result.weights != 0).flatten(0, -2).any(0)
        for e in torch.nonzero(~used).flatten().tolist():
            prefix = f"{layer_name}.experts."
            unused |= {n for n, _ in model.named_parameters() if n.startswith(prefix) and n.endswith(f".weights.{e}")}
    return unused


def _check_backward(name, model):
    """timm: a train-mode forward is finite and every parameter gets a gradient; here every one but the expert
    weights of experts that no patch was routed to (top-1 routing on a small batch), in the phase where the
    routers' keys are trainable."""
    model.train()
    model.backbone.set_keys_trainable(True)
    with pce.record_routing(model) as rec:
        out = model(_small(name))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.mean().backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    unused = _unused_expert_params(model, rec.records)
    assert missing <= unused, f"no gradient for {sorted(missing - unused)}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    routers = list(model.backbone.key_routers())
    assert all(p.grad is not None for r in routers for p in r.parameters())  # keys in the graph
    assert bool(routers) == name.startswith("pce_") and (name.startswith("pce_") or not missing)
    model.zero_grad(set_to_none=True)
    model.backbone.set_keys_trainable(False)


def _spp(feat, mode="avg"):
    pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    return torch.cat([pool(feat, level).flatten(1) for level in (1, 2, 4)], dim=1)


@torch.no_grad()
def _check_head_api(model, x):
    """forward_head(pre_logits) is the SPP of forward_features; reset_classifier(0) / (0, "") / "max"."""
    model.eval()
    feat = model.forward_features(x)
    pre = model.forward_head(feat, pre_logits=True)
    logits = model(x)
    assert model.head_hidden_size == 21 * model.num_features and pre.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(pre, _spp(feat))
    torch.testing.assert_close(logits, F.linear(_spp(feat), model.fc.weight, model.fc.bias))
    assert model.get_classifier() is model.fc
    model.reset_classifier(0)  # timm: forward gives the pooled features
    assert model.num_classes == 0 and "fc.weight" not in model.state_dict()
    torch.testing.assert_close(model(x), pre)
    model.reset_classifier(0, "")  # no pooling either: the map
    assert torch.equal(model(x), feat)
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(3, "")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "token")
    model.reset_classifier(3, "max")
    assert model(x).shape == (2, 3) and model.fc.in_features == model.head_hidden_size
    torch.testing.assert_close(model.forward_head(feat, pre_logits=True), _spp(feat, "max"))


@pytest.mark.parametrize("name", PRESETS)
def test_default_model_cfg_backward_and_head(name):
    """One default build per preset: timm's test_model_default_cfgs, test_model_backward, the head API."""
    model = timm.create_model(name)
    _check_pretrained_cfg(name, model)
    _check_backward(name, model)
    _check_head_api(model, _small(name))


# -- num_classes=0 / global_pool="" at creation (timm's feature-extractor idiom) -------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_create_model_without_classifier(name):
    x = _small(name)
    ref = _reference(name)
    with torch.no_grad():
        feat = ref.forward_features(x)
        pooled = ref(x)
        assert pooled.shape == (2, ref.head_hidden_size) and not list(ref.fc.parameters())
        torch.testing.assert_close(pooled, _spp(feat))
        unpooled = _seeded(name, num_classes=0, global_pool="")(x)
    assert torch.equal(unpooled, feat)
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model(name, num_classes=3, global_pool="")


# -- forward_intermediates / prune_intermediate_layers -----------------------------------------------------------
class _StageCounter:
    def __init__(self, model):
        self.calls = []
        self.handles = [s.register_forward_hook(lambda m, i, o, k=k: self.calls.append(k))
                        for k, s in enumerate(model.backbone.stages)]


@pytest.mark.parametrize("name", PRESETS)
def test_forward_intermediates_and_prune(name):
    model = copy.deepcopy(_reference(name))
    model.reset_classifier(4)
    x = _small(name)
    n = len(_stages(name))
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x)) and len(inter) == len(info) == n
        for i, (c, r, t) in enumerate(zip(info.channels(), info.reduction(), inter)):
            assert t.shape == (2, c, math.ceil(x.shape[2] / r), math.ceil(x.shape[3] / r))
            assert model.get_submodule(info.module_name(i)) is model.backbone.stages[i]
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert len(only) == 2 and torch.equal(only[0], inter[0]) and torch.equal(only[1], inter[-1])
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last2, inter[-2:]))
        counter = _StageCounter(model)
        model.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
        assert counter.calls == [0]
        early_final, _ = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert torch.equal(early_final, final)  # the final map is always forward_features'
        for bad in ([n], n + 1, [-n - 1]):
            with pytest.raises(ValueError, match="out of range|the model has"):
                model.forward_intermediates(x, indices=bad)
        with pytest.raises(ValueError, match="NCHW"):
            model.forward_intermediates(x, output_fmt="NHWC")
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.backbone.stages) == 2 and len(model.feature_info) == 2 and model.num_classes == 0
        assert not any(k.startswith("backbone.stages.2.") for k in model.state_dict())
        assert torch.equal(model(x), inter[1]) and model.num_features == info.channels()[1]
        kept = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(kept, inter[:2]))


# -- features_only ------------------------------------------------------------------------------------------------
def _unwrap(out):
    return list(out.values()) if isinstance(out, dict) else out


def _feature_cases():
    for name in PRESETS:
        for feature_cls in FEATURE_CLS:
            if name not in SLOW or feature_cls in (None, "getter"):
                yield name, feature_cls


@pytest.mark.parametrize("name, feature_cls", list(_feature_cases()))
def test_features_only_every_feature_cls(name, feature_cls):
    """The maps equal a seeded twin's stages; feature_info as timm's; the unused last stage is pruned.
    ``feature_cls=None`` (timm's default) also keeps the default out_indices: every stage."""
    n = len(_stages(name))
    out_indices = tuple(range(n)) if feature_cls is None else (0, n - 2)
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls, out_indices=out_indices)
    feats = _seeded(name, features_only=True, **kwargs)
    ref_info = FeatureInfo(_reference(name).feature_info, out_indices)
    assert feats.feature_info.out_indices == out_indices
    assert feats.feature_info.channels() == ref_info.channels()
    assert feats.feature_info.reduction() == ref_info.reduction()
    assert feats.pretrained_cfg["architecture"] == name and feats.in_chans == backbone_config(name)["in_chans"]
    x = _small(name)
    with torch.no_grad():
        out = feats(x)
        expected = _reference(name).forward_intermediates(x, list(out_indices), intermediates_only=True)
    if feature_cls == "dict":
        assert list(out) == [str(i) for i in out_indices]
    got = _unwrap(out)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    if feature_cls in ("list", "dict", "getter"):  # timm's pruning: the unused last stage is gone
        assert not any(f"stages.{n - 1}." in k for k in feats.state_dict())


def test_features_only_errors_say_what_is_valid():
    for name in PRESETS:
        n = len(_stages(name))
        with pytest.raises(ValueError, match="out of range"):
            timm.create_model(name, features_only=True, out_indices=(n,))
        with pytest.raises(ValueError, match="feature_cls"):
            timm.create_model(name, features_only=True, feature_cls="nope")


# -- output_stride ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, output_stride", [(n, s) for n in PRESETS for s in (8, 16) if n not in SLOW or s == 16])
def test_output_stride(name, output_stride):
    nominal = _reference(name).feature_info
    feats = timm.create_model(name, features_only=True, output_stride=output_stride)
    assert feats.feature_info.reduction() == [min(f["reduction"], output_stride) for f in nominal]
    assert feats.feature_info.channels() == [f["num_chs"] for f in nominal]
    x = _small(name, 1)
    with torch.no_grad():
        maps = feats(x)
    for m, r in zip(maps, feats.feature_info.reduction()):
        assert m.shape[-2:] == (math.ceil(x.shape[2] / r), math.ceil(x.shape[3] / r))


def test_output_stride_classifier_and_errors():
    clf = timm.create_model("pce_tiny", num_classes=3, output_stride=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the head reads the stride-16 map
        assert clf.forward_features(x).shape == (1, 256, 4, 4) and clf(x).shape == (1, 3)
    with pytest.raises(ValueError, match="power of two"):
        timm.create_model("pce_tiny", features_only=True, output_stride=12)


# -- smp's timm-universal encoder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, reductions", [("DeepLabV3Plus", [4, 8, 16, 16]), ("PAN", [4, 8, 16, 16]),
                                              ("FPN", [4, 8, 16, 32]), ("Unet", [4, 8, 16, 32])])
def test_smp_tu_pce_tiny(arch, reductions):
    net = smp.create_model(arch, encoder_name="tu-pce_tiny", encoder_weights=None, classes=3).eval()
    assert net.encoder.model.feature_info.reduction() == reductions
    assert net.encoder.out_channels == [3, 0, 32, 64, 128, 256]  # smp's 0-channel stand-in for stride 2
    with torch.no_grad():
        y = net(torch.randn(1, 3, 256, 256))
    assert y.shape == (1, 3, 256, 256) and torch.isfinite(y).all()


# -- keyword arguments ------------------------------------------------------------------------------------------------
def test_in_chans_drop_rate_and_backbone_overrides():
    grey = timm.create_model("pce_tiny", in_chans=1, num_classes=2).eval()
    assert grey.in_chans == 1 and grey.get_submodule(grey.pretrained_cfg["first_conv"]).in_channels == 1
    assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 2)
    colour = timm.create_model("pce_fmnist", in_chans=3)
    assert colour.backbone.stem[0][0].in_channels == 3
    dropped = timm.create_model("pce_fmnist", drop_rate=0.5).train()
    assert dropped.drop.p == 0.5
    pre = dropped.forward_head(torch.rand(2, 192, 4, 4) + 1, pre_logits=True)
    assert (pre == 0).any() and not (pre == 0).all()  # dropout before the FC layer, as in timm
    gate = timm.create_model("pce_cifar", router="gate", num_experts=3)
    assert all(type(layer.router).__name__.lower().startswith("gate") for layer in gate.backbone.pce_layers())
    assert all(layer.router.num_experts == 3 for layer in gate.backbone.pce_layers())
    deep = timm.create_model("pce_fmnist", drop_path_rate=0.3)  # timm's stochastic depth: rates 0 .. 0.3
    rates = [m.drop_prob for m in deep.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.15, 0.3], abs=1e-6)  # 3 layers: 0 (no DropPath), 0.15, 0.3
    with pytest.raises(ValueError, match="drop_path_rate"):
        timm.create_model("pce_fmnist", drop_path_rate=1.5)
    with pytest.raises(TypeError, match="unknown backbone option"):
        timm.create_model("pce_fmnist", not_an_option=1)
