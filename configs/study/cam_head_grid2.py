# Issue #26 routing, PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py): a 2x2 patch grid instead of 3x3.
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=2, router="gap_conv",
                           execution="context", noise=0.0)])
