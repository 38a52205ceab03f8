"""CondConv at any convolution (pce.models.condconv, ``model.condconv``): each image's output equals a plain
convolution with the hand-mixed kernel sum_e r_e W_e; upcycling is exact with a zero routing weight; the routing
weight's random start breaks the experts' symmetry; config entries are validated and applied by the task."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pce.models.condconv import CondConvLayer, convert_condconv


def _hand(layer: CondConvLayer, x: torch.Tensor) -> torch.Tensor:
    """Per image: r = sigmoid(W_r mean(x) + b_r); kernel = sum_e r_e W_e; F.conv2d with the conv's settings."""
    c = layer.conv
    outs = []
    for b in range(x.shape[0]):
        r = torch.sigmoid(x[b].mean(dim=(1, 2)) @ layer.routing.weight.T + layer.routing.bias)
        w = sum(r[e] * c.weight[e] for e in range(c.num_experts)).view(c.weight_shape)
        bias = None if c.bias is None else sum(r[e] * c.bias[e] for e in range(c.num_experts))
        outs.append(F.conv2d(x[b:b + 1], w, bias, c.stride, c.padding, c.dilation, c.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, groups=2),
                                dict(kernel_size=1, bias=False)])
def test_per_image_kernel_mixing_equals_the_hand_computation(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **kw)
    layer = CondConvLayer(conv, num_experts=3, init_std=0.5)
    with torch.no_grad():
        layer.conv.weight.normal_()          # experts made different, as after training
    x = torch.randn(3, 4, 9, 9)
    out = layer(x)
    assert out.shape == conv(x).shape
    torch.testing.assert_close(out, _hand(layer, x), rtol=1e-4, atol=1e-4)
    assert layer.last_routing.shape == (3, 3)


def test_upcycled_layer_is_the_original_convolution_until_routing_moves():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    layer = CondConvLayer(conv, num_experts=4)
    x = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        layer.routing.weight.zero_()         # sigmoid(0) = 1/2 for every expert: sum_e 1/2 * 2W/E = W
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    # with the default small random routing start the experts receive different gradients
    layer = CondConvLayer(conv, num_experts=4)
    layer(x).square().mean().backward()
    g = layer.conv.weight.grad
    assert not torch.allclose(g[0], g[1])


def test_convert_selects_like_pce_convert_and_errors_name_the_target():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model, names = convert_condconv(model, "2", num_experts=2)
    assert names == ["2"] and isinstance(model[2], CondConvLayer) and type(model[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="^9: no module of that name"):
        convert_condconv(model, "9")


def test_config_entries_are_validated_and_applied(tmp_path):
    from pce.engine import load_config
    from pce.engine.errors import PCEError
    from pce.engine.validation import ConfigError
    from pce.tasks import get_task

    base = ("task = 'classification'\nmodel = dict(backbone='dense_fmnist', num_classes=10, "
            "input_shape=(1, 28, 28), condconv=[{entry}])\n")
    path = tmp_path / "c.py"
    path.write_text(base.format(entry="dict(target='backbone.stages.2.down.0', num_expert=2)"))
    with pytest.raises(ConfigError, match=r"model.condconv.0.num_expert'.*did you mean 'num_experts'"):
        load_config(path)
    path.write_text(base.format(entry="dict(target='backbone.stages.2.down.0', init_std=-0.1)"))
    with pytest.raises(ConfigError, match=r"model.condconv.0.init_std' .*must be a number >= 0"):
        load_config(path)
    path.write_text(base.format(entry="dict(target='backbone.nowhere', num_experts=2)"))
    with pytest.raises(PCEError, match="model.condconv.0"):
        get_task("classification").build_model(load_config(path))
    path.write_text(base.format(entry="dict(target='backbone.stages.*.down.0', num_experts=2)"))
    model = get_task("classification").build_model(load_config(path))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("down.0")}
    assert kinds == {f"backbone.stages.{i}.down.0": "CondConvLayer" for i in range(3)}
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
