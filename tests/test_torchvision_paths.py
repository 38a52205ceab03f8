"""The plain torchvision ways of putting a detector on a PCE backbone (the README's "torchvision path"):
torchvision's own FasterRCNN / MaskRCNN / RetinaNet with their defaults on ``PCEFPNBackbone(pce.build_backbone(...))``
(maps named '0', '1', ... and 'pool', as torchvision's BackboneWithFPN names them), checked against
torchvision's BackboneWithFPN itself; and the one-line error when BackboneWithFPN is handed the backbone."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import pce
from pce.tasks.detection import PCEFPNBackbone

FRCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def _data():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 64, generator=g)]
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    masks[0, 0, 8:40, 8:40] = masks[1, 0, 20:60, 4:30] = 1
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([[4.0, 20.0, 30.0, 60.0]])]
    return images, [{"boxes": b, "labels": torch.tensor([1 + i]), "masks": m} for i, (b, m) in enumerate(zip(boxes, masks))]


def _backbone():
    torch.manual_seed(0)
    return pce.build_backbone("pce_tiny", num_experts=2)


@pytest.mark.parametrize("detector,losses", [(FasterRCNN, FRCNN_LOSSES), (MaskRCNN, FRCNN_LOSSES | {"loss_mask"})])
def test_torchvision_rcnn_with_its_defaults(detector, losses):
    """No box_roi_pool, no anchor generator: torchvision's MultiScaleRoIAlign(['0', '1', '2', '3']) and its five
    anchor sizes meet PCE's four stage levels + 'pool'."""
    model = detector(PCEFPNBackbone(_backbone(), fpn_channels=32), num_classes=3, min_size=64, max_size=64)
    images, targets = _data()
    out = model.train()(images, targets)
    assert set(out) == losses and all(torch.isfinite(v) for v in out.values())
    dets = model.eval()(images)
    assert len(dets) == 2 and {"boxes", "labels", "scores"} <= set(dets[0])
    assert ("masks" in dets[0]) == (detector is MaskRCNN)


def test_torchvision_retinanet_with_p6p7():
    fpn = PCEFPNBackbone(_backbone(), returned_stages=[1, 2, 3], fpn_channels=32, extra_blocks=LastLevelP6P7(32, 32))
    assert [f["name"] for f in fpn.feature_info] == ["0", "1", "2", "p6", "p7"]
    assert [f["stride"] for f in fpn.feature_info] == [8, 16, 32, 64, 128]
    model = RetinaNet(fpn, num_classes=3, min_size=64, max_size=64)
    images, targets = _data()
    out = model.train()(images, targets)
    assert set(out) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in out.values())
    assert len(model.eval()(images)) == 2


def test_pce_fpn_backbone_is_torchvision_backbone_with_fpn():
    """The reference: torchvision's BackboneWithFPN on the same modules laid out as direct children (stem, stage1,
    ...), with the same FPN weights, gives the same maps under the same names."""
    body = _backbone().eval()
    ours = PCEFPNBackbone(body, fpn_channels=16).eval()
    chain = nn.Sequential(OrderedDict([("stem", body.stem)] + [(f"stage{i + 1}", s) for i, s in enumerate(body.stages)]))
    ref = BackboneWithFPN(chain, {f"stage{i + 1}": str(i) for i in range(4)}, body.out_channels, 16).eval()
    ref.fpn.load_state_dict(ours.fpn.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert list(a) == list(b) == ["0", "1", "2", "3", "pool"] and ours.out_channels == ref.out_channels == 16
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert ours.featmap_names == ["0", "1", "2", "3"] and [f["stage"] for f in ours.feature_info][:4] == \
        [f["name"] for f in body.feature_info]


def test_backbone_with_fpn_on_a_pce_backbone_says_what_to_pass():
    """BackboneWithFPN(pce_backbone, ...): its IntermediateLayerGetter runs direct children in turn; the stage
    maps are not direct children, so calling the stages raises PCE's one line naming PCEFPNBackbone."""
    bb = _backbone()
    assert [n for n, _ in bb.named_children()] == ["stem", "stages"]
    wrapped = BackboneWithFPN(bb, {"stages": "0"}, [bb.out_channels[-1]], 16)
    with pytest.raises(TypeError, match=r"^PCEBackbone\.stages: .*BackboneWithFPN.*PCEFPNBackbone\(backbone") as e:
        wrapped(torch.randn(1, 3, 64, 64))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="return_layers are not present"):  # torchvision's own check
        BackboneWithFPN(bb, {"stage1": "0"}, [32], 16)
    assert isinstance(bb.stages[:2], nn.ModuleList) and type(bb.stages[:2]) is type(bb.stages)   # slices too
    assert list(bb.state_dict())[0].startswith("stem.") and any(k.startswith("stages.3.") for k in bb.state_dict())
