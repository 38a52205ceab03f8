# Issue #26 routing, PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py):
# E = 8 expert kernels instead of 4.
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=8, top_k=2, grid=3, router="gap_conv",
                           execution="context", noise=0.0)])
