# Issue #26 routing, PatchConvMoE head (configs/demo_seg_patchmoe.py): top-1 instead of top-2.
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=1, grid=3, router="gap_conv",
                           execution="context", noise=0.0)])
