# Issue #26 routing, PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py): expert choice (each expert picks its
# patches) instead of the gap_conv gate; "isolated" execution (a patch may get 0..E experts).
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="expert_choice",
                           execution="isolated", noise=0.0)])
