import pytest
import timm
import torch

import pce
from pce.models.presets import build_backbone, list_backbones
from pce.models.classifier import PCEClassifier, build_classifier
from routing_helpers import run_routed
from pce.moe.losses import routing_aux_losses


def _expected(size, stride):
    return -(-size // stride)  # ceil: 3x3 stride-2 convs with padding 1


@pytest.mark.parametrize("name,sizes", [("pce_fmnist", [(28, 28), (32, 20)]), ("pce_tiny", [(64, 64), (96, 128), (100, 72)]),
                                        ("dense_tiny", [(64, 96)]), ("pce_cifar", [(32, 32)])])
def test_feature_info_matches_shapes(name, sizes):
    b = build_backbone(name)
    for h, w in sizes:
        feats = b(torch.randn(1, b.in_chans, h, w))
        assert list(feats) == [f["name"] for f in b.feature_info]
        for f, t in zip(b.feature_info, feats.values()):
            assert t.shape == (1, f["channels"], _expected(h, f["stride"]), _expected(w, f["stride"]))


def test_presets_have_dense_twins_with_same_feature_info():
    names = list_backbones()
    for n in names:
        if n.startswith("pce_"):
            twin = "dense_" + n[4:]
            assert twin in names
    p, d = build_backbone("pce_tiny"), build_backbone("dense_tiny")
    assert [(f["channels"], f["stride"]) for f in p.feature_info] == [(f["channels"], f["stride"]) for f in d.feature_info]
    _, routing = d(torch.randn(1, 3, 64, 64), return_routing=True)
    assert routing == []


def test_routing_is_returned_per_layer():
    b = build_backbone("pce_tiny", router="gate", num_experts=6)
    feats, routing = b(torch.randn(2, 3, 64, 64), return_routing=True)
    assert len(routing) == sum(1 for _ in b.pce_layers()) == 4
    for r in routing:
        assert r.weights.shape[0] == 2 and r.weights.shape[2] == 6
        assert r.weights.shape[1] == r.grid[0] * r.grid[1]
        assert (r.weights >= 0).all() and (r.weights.sum(-1) <= 1 + 1e-5).all()
        assert "balance" in routing_aux_losses(r)


@pytest.mark.parametrize("router", ["cosine", "gate", "gumbel", "positional", "uniform", "expert_choice"])
def test_every_router_override_builds(router):
    b = build_backbone("pce_fmnist", router=router, num_experts=3, top_k=1)
    assert b(torch.randn(2, 1, 28, 28))["stage3"].shape == (2, 192, 4, 4)


def test_bad_backbone_requests():
    with pytest.raises(KeyError, match="unknown backbone preset 'pce_huge'"):
        build_backbone("pce_huge")
    with pytest.raises(TypeError, match="unknown backbone option"):
        build_backbone("pce_tiny", experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        build_backbone("pce_tiny", num_experts=0)
    with pytest.raises(ValueError, match=r"expects input \[B, 3, H, W\]"):
        build_backbone("pce_tiny")(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("pce_tiny", padding="error")(torch.randn(1, 3, 96, 96))
    assert build_backbone("pce_tiny", padding="error").size_divisibility == 64


def test_keys_phase_switch_and_kmeans_init():
    b = build_backbone("pce_fmnist")
    keys = list(b.key_routers())
    assert len(keys) == 3 and all(not r.keys.requires_grad for r in keys)
    before = [r.keys.detach().clone() for r in keys]
    n = b.init_keys([torch.randn(8, 1, 28, 28) for _ in range(2)])
    assert n == 3
    for r, old in zip(keys, before):
        assert not torch.equal(r.keys, old)
        assert torch.allclose(r.keys.norm(dim=-1), torch.ones(r.num_experts), atol=1e-5)
    b.set_keys_trainable(True)
    assert all(r.keys.requires_grad for r in keys)


def test_attention_stage_and_switch():
    stages = [dict(channels=16, depth=1, patch_size=4, stride=1, attention=True),
              dict(channels=32, depth=1, patch_size=2, stride=2, attention=True)]
    b = pce.PCEBackbone(stages, in_chans=3, stem_channels=16, stem_stride=2,
                        attention_kwargs={"num_heads": 2, "layer_scale_init": 0.5})
    x = torch.randn(1, 3, 32, 32)
    y_on = b(x)["stage2"]
    b.set_attention_enabled(False)
    y_off = b(x)["stage2"]
    assert not torch.allclose(y_on, y_off)
    b.set_attention_enabled(True)
    b(x)["stage2"].sum().backward()
    attn = [m for m in b.modules() if isinstance(m, pce.DeformableAttention)]
    assert len(attn) == 2 and all(a.offset[-1].weight.grad is not None for a in attn)


def test_deformable_attention_samples_reference_points_at_init():
    import torch.nn.functional as F

    att = pce.DeformableAttention(8, num_heads=2, stride=2).eval()
    x = torch.randn(1, 8, 8, 8)
    pts = att.sample_points(att.q(x))
    # zero-initialised offsets: the reference grid centres of a 4x4 grid
    centres = (torch.arange(4) + 0.5) / 4 * 2 - 1
    assert torch.allclose(pts[0, :, :, 0], centres.expand(4, 4), atol=1e-6)
    assert torch.allclose(pts[0, :, :, 1], centres[:, None].expand(4, 4), atol=1e-6)
    # sampling the exact centres of 2x2 blocks with bilinear interpolation = 2x2 average pooling
    sampled = F.grid_sample(x, pts, align_corners=False)
    torch.testing.assert_close(sampled, F.avg_pool2d(x, 2))


def test_timm_registration():
    m = timm.create_model("pce_tiny", features_only=True, out_indices=(1, 3))
    assert m.feature_info.channels() == [64, 256] and m.feature_info.reduction() == [8, 32]
    outs = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256]
    clf = timm.create_model("pce_fmnist", num_classes=7)
    assert clf(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("pce_tiny", pretrained=True)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_classifier("pce_fmnist", 3, num_experts=2)
    x = torch.randn(12, 1, 28, 28)
    y = torch.arange(12) % 3
    x[y == 1] += 1.0
    x[y == 2, :, :14] -= 1.0
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        logits, routing = run_routed(model, x)
        loss = torch.nn.functional.cross_entropy(logits, y) + pce.router_loss(routing)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_classifier_head_and_errors():
    clf = PCEClassifier("pce_cifar", 10, router="gate")
    logits, routing = run_routed(clf, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and len(routing) == 3
    with pytest.raises(ValueError, match="num_classes"):
        PCEClassifier("pce_cifar", -1)


def _tiny_stages(**per_stage):
    """pce_tiny's stages with per-stage overrides ``{index: {key: value}}``."""
    from pce.models.presets import backbone_config

    stages = backbone_config("pce_tiny")["stages"]
    for i, extra in per_stage.items():
        stages[int(i)].update(extra)
    return stages


def test_experts_can_be_placed_in_some_stages_only():
    stages = _tiny_stages(**{"0": dict(layer="dense"), "1": dict(layer="dense"), "3": dict(num_experts=2)})
    b = build_backbone("pce_tiny", stages=stages, num_experts=4, execution="context")
    kinds = [type(layer).__name__ for st in b.stages for layer in st.layers]
    assert kinds == ["DenseLayer", "DenseLayer", "PCELayer", "PCELayer"]
    assert [f["layer"] for f in b.feature_info] == ["dense", "dense", "pce", "pce"]
    feats, routing = b(torch.randn(2, 3, 64, 64), return_routing=True)
    assert [r.weights.shape[-1] for r in routing] == [4, 2]  # stage 3: the backbone's E, stage 4: its own
    # a dense stage is the dense twin's stage: same weights -> same output
    twin = build_backbone("dense_tiny")
    b.stem.load_state_dict(twin.stem.state_dict())
    b.stages[0].load_state_dict(twin.stages[0].state_dict())
    b.eval(), twin.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(b.stages[0](b.stem(x)), twin.stages[0](twin.stem(x)))
    # upcycling and router overrides reach the PCE stages only
    assert b.upcycle_experts() == 2
    # with every layer dense, padding="error" constrains nothing beyond the strides
    all_dense = build_backbone("pce_tiny", padding="error", stages=_tiny_stages(**{str(i): dict(layer="dense") for i in range(4)}))
    assert all_dense.size_divisibility == 32 and not list(all_dense.pce_layers())
    with pytest.raises(ValueError, match="stage 2: layer must be one of 'dense' or 'pce'.*got 'moe'"):
        build_backbone("pce_tiny", stages=_tiny_stages(**{"2": dict(layer="moe")}))
    with pytest.raises(ValueError, match="stage 1: num_experts must be an integer >= 1"):
        build_backbone("pce_tiny", stages=_tiny_stages(**{"1": dict(num_experts=0)}))


def test_truncate_stages_and_intermediate_index_errors():
    from pce.models.presets import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("pce_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = bb.forward_intermediates(x, intermediates_only=True)
    with pytest.raises(ValueError, match="out of range"):
        bb.forward_intermediates(x, indices=[7])
    with pytest.raises(ValueError, match="last n stages"):
        bb.forward_intermediates(x, indices=5)
    n_params = sum(p.numel() for p in bb.parameters())
    bb.truncate_stages(2)
    assert len(bb.stages) == 2 and bb.out_indices == (0, 1) and bb.num_features == 64
    assert len(bb.spec.stages) == 2 and bb.spec.out_indices == (0, 1)
    assert [f["channels"] for f in bb.feature_info] == bb.out_channels == [32, 64]
    assert sum(p.numel() for p in bb.parameters()) < n_params
    with torch.no_grad():
        kept = list(bb(x).values())
    assert all(torch.equal(a, b) for a, b in zip(kept, full[:2]))
    with pytest.raises(ValueError, match="keeps 1 .. 2"):
        bb.truncate_stages(3)


# -- specs -------------------------------------------------------------------------------------------------------
def test_presets_are_frozen_specs_and_kwargs_build_the_same_model():
    import dataclasses

    from pce.models.presets import backbone_config, backbone_spec
    from pce.models.specs import BackboneSpec, LayerSpec, StageSpec

    spec = pce.BACKBONES.get("pce_tiny")
    assert isinstance(spec, BackboneSpec) and spec.layer == LayerSpec(num_experts=4, top_k=1)
    assert pce.BACKBONES.get("dense_tiny") == dataclasses.replace(spec, kind="dense")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.layer.top_k = 2
    assert BackboneSpec.from_kwargs(**spec.to_kwargs()) == spec  # the kwargs round trip
    # one override changes every stage's layer spec; a stage's own num_experts wins over the backbone's
    gate = backbone_spec("pce_tiny", router="gate", num_experts=8)
    assert gate == spec.with_layer(router="gate", num_experts=8)
    stages = list(spec.stages[:3]) + [dataclasses.replace(spec.stages[3], num_experts=2, kind="dense")]
    mixed = dataclasses.replace(gate, stages=tuple(stages))
    assert [mixed.stage_layer(i)[1].num_experts for i in range(4)] == [8, 8, 8, 2]
    assert mixed.stage_layer(3)[0] == "dense"
    assert mixed.stage_layer(2) == ("pce", LayerSpec(patch_size=4, num_experts=8, router="gate", top_k=1))
    assert BackboneSpec.from_kwargs(**mixed.to_kwargs()) == mixed
    # a spec, the keyword constructor and the preset give one model: same seed, same parameters, same outputs
    built = []
    overrides = dict(router="gate", num_experts=8)
    for make in (lambda: pce.PCEBackbone.from_spec(gate), lambda: build_backbone("pce_tiny", **overrides),
                 lambda: pce.PCEBackbone(**backbone_config("pce_tiny", **overrides))):
        torch.manual_seed(0)
        built.append(make().eval())
    x = torch.randn(1, 3, 64, 64)
    for other in built[1:]:
        assert other.spec == gate
        assert all(torch.equal(a, b) for a, b in zip(built[0].state_dict().values(), other.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(built[0](x).values(), other(x).values()))
    assert isinstance(spec.stages[0], StageSpec) and spec.stages[0].to_dict()["patch_size"] == 16


def test_layer_registry_and_layer_specs():
    from pce.models.layer import DenseLayer, PCELayer
    from pce.models.specs import BackboneSpec, LayerSpec

    assert pce.registry.LAYERS.get("pce") is PCELayer and pce.registry.LAYERS.get("dense") is DenseLayer
    spec = LayerSpec(4, num_experts=3, router="gate", router_kwargs={"top_k": 2, "capacity_factor": 1.5})
    assert spec.top_k == 2 and spec.router_kwargs == {"capacity_factor": 1.5}  # top_k lives in one place
    assert spec.router_args() == {"capacity_factor": 1.5, "top_k": 2}
    torch.manual_seed(0)
    a = PCELayer.from_spec(8, spec)
    torch.manual_seed(0)
    b = PCELayer(8, 4, num_experts=3, router="gate", top_k=2, router_kwargs={"capacity_factor": 1.5})
    assert a.spec == b.spec == spec and a.router.top_k == 2 and a.router.capacity_factor == 1.5
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert PCELayer(8, 2, spec=spec).patch_size == 2  # keyword options override the spec
    assert DenseLayer.from_spec(8, spec).experts.num_experts == 1
    with pytest.raises(TypeError, match=r"unknown PCE layer option\(s\) \['experts'\]"):
        PCELayer(8, 4, experts=3)
    with pytest.raises(TypeError, match="needs a patch_size"):
        PCELayer(8)
    with pytest.raises(ValueError, match="no patch_size"):  # a backbone's stages set the patch sizes
        BackboneSpec((dict(channels=8, patch_size=2),), layer=spec)


def test_stage_indices_follow_timm():
    from pce.models.backbone import stage_indices

    assert stage_indices(4, None) == [0, 1, 2, 3] and stage_indices(4, 2) == [2, 3]
    assert stage_indices(4, (-1, 0, 0)) == [0, 3] and stage_indices(4, range(2)) == [0, 1]
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(ValueError, match="the model has 4 stages"):
            stage_indices(4, bad)
    b = pce.PCEBackbone([dict(channels=8, patch_size=2, stride=1), dict(channels=8, patch_size=2)],
                        stem_channels=8, out_indices=[-1, 0])
    assert b.out_indices == (0, 1) and list(b(torch.randn(1, 3, 16, 16))) == ["stage1", "stage2"]
