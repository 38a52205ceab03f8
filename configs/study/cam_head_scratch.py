# Issue #26, experts that differ from the start (as configs/study/seg_head_scratch.py): the PatchConvMoE head of
# configs/demo_camelyon_seg_patchmoe.py with no shared phase and experts drawn far apart (noise=1.0).
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                           execution="context", noise=1.0)])
phases = [dict(name="route", epochs=-1)]
