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
