# Issue #26 routing, PatchConvMoE head (configs/demo_seg_patchmoe.py): the pooled-MLP gate instead of the gap_conv
# gate.
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gate",
                           execution="context", noise=0.0)])
