# Issue #26 upcycling, PatchConvMoE head: no shared phase and no upcycling, the gate routes from the first epoch
# (experts start as noisy copies of the dense classifier: noise=0.01).
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                           execution="context", noise=0.01)])
phases = [dict(name="route", epochs=-1)]
