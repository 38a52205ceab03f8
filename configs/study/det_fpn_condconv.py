# Issue #26, detection: timm's CondConv2d (4 kernels mixed per image, upcycled from the dense convolution) at the
# place of configs/study/det_fpn_pce.py, the FPN's four 3x3 output convolutions of the dense twin
# configs/demo_det_dense.py -- the outside baseline, per-image instead of per-patch routing.
#   python tools/train.py configs/study/det_fpn_condconv.py --seed 0
_base_ = ["../demo_det_dense.py"]
model = dict(condconv=[dict(target="backbone.fpn.layer_blocks.*.0", num_experts=4)])
