# Issue #26 routing, PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py): cosine-key routing instead of the
# gap_conv gate.
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="cosine",
                           execution="context", noise=0.0)])
