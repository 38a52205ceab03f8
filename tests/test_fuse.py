import copy

import pytest
import torch

import pce
from pce.models.classifier import build_classifier
from pce.models.fuse import fuse_for_inference


@pytest.mark.parametrize("expert", ["residual", "double_conv", "conv_bn_relu"])
def test_fused_model_matches_eval_model(expert):
    model = build_classifier("pce_fmnist", 10, expert=expert, num_experts=3)
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28) * 2 + 0.5)
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_for_inference(model)
        out = fused(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused.train()


def test_fuse_dense_backbone():
    b = pce.build_backbone("dense_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = b(x)["stage4"]
        out = fuse_for_inference(b)(x)["stage4"]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _converted_resnet(**router_kwargs):
    """A timm ResNet-18 with layer4's conv2 (each followed by bn2 in its block, not in an nn.Sequential) converted
    with distinct experts, and non-trivial batch-norm statistics everywhere, in eval mode."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    pce.convert(model, "layer4.*.conv2", num_experts=4, top_k=2, grid=3, noise=0.3, **router_kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_batch_norm_after_a_pce_conv_folds_into_every_expert():
    from pce.models.fuse import capture_blockers, fold_conv_bn

    model = _converted_resnet()
    assert capture_blockers(model) == []  # PCEConv2d runs its dense implementation under capture
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(), pce.record_routing(model) as rec:
        ref = model(x)
    assert any((r.weights[..., e] > 0).any() and (r.weights[..., e] == 0).any() for r in rec.results for e in range(4))
    fused = copy.deepcopy(model)
    pairs = fold_conv_bn(fused)
    assert ("layer4.0.conv2", "layer4.0.bn2") in pairs and ("layer4.1.conv2", "layer4.1.bn2") in pairs
    assert ("conv1", "bn1") in pairs and ("layer1.0.conv1", "layer1.0.bn1") in pairs  # plain convs, by the FX graph
    assert isinstance(fused.layer4[0].bn2, torch.nn.Identity) and fused.layer4[0].conv2.experts.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref, atol=1e-4, rtol=1e-4)
    full = fuse_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in full.modules())
    with torch.no_grad():
        torch.testing.assert_close(full(x), ref, atol=1e-4, rtol=1e-4)


def test_batch_norm_after_a_pce_conv_whose_weights_need_not_sum_to_one_stays():
    model = _converted_resnet(router="gate", renormalize=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_for_inference(model)
        out = fused(x)
    assert isinstance(fused.layer4[0].bn2, torch.nn.BatchNorm2d) and isinstance(fused.layer4[0].bn1, torch.nn.Identity)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
