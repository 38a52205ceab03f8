# Issue #26, detection: PatchConvMoE's placement carried over to Faster R-CNN + FPN -- the dense twin
# configs/demo_det_dense.py with pce.PCEConv2d in place of the FPN's four 3x3 output convolutions
# (backbone.fpn.layer_blocks.*.0, 64 -> 64 channels, the last convolution before the RPN and RoI heads): 4 expert
# kernels each, a 3 x 3 grid, top-2, the gap_conv gate; half the epochs with every patch on expert 0, then
# upcycled and routed (as configs/demo_seg_patchmoe.py).
#   python tools/train.py configs/study/det_fpn_pce.py --seed 0
_base_ = ["../demo_det_dense.py"]
model = dict(
    convert=[dict(target="backbone.fpn.layer_blocks.*.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                  execution="context", noise=0.0)],
)
phases = [
    dict(name="shared", epochs=12, router_override="shared"),
    dict(name="route", epochs=-1, upcycle=True),
]
