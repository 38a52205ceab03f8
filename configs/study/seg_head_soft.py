# Issue #26 routing, PatchConvMoE head (configs/demo_seg_patchmoe.py): a soft per-sample mixture (one cell per
# image, every expert weighted: top_k=None) instead of top-2 over 3x3 patches.
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=None, grid=1, router="gap_conv",
                           execution="context", noise=0.0)])
