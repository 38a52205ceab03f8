# Issue #26 stabilisation, PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py): the first phase runs all
# experts summed (router_override="all_experts", reduce="sum") instead of sending every patch to expert 0.
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
phases = [
    dict(name="stabilise", epochs=6, router_override="all_experts", router_override_kwargs=dict(reduce="sum")),
    dict(name="route", epochs=-1),
]
