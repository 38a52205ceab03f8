# Issue #26 stabilisation, PatchConvMoE on the last stage: the first phase runs all experts summed
# (router_override="all_experts", reduce="sum") instead of sending every patch to expert 0 ("shared").
_base_ = ["../fmnist_cls_patchmoe.py"]
phases = [
    dict(name="stabilise", epochs=4, router_override="all_experts", router_override_kwargs=dict(reduce="sum")),
    dict(name="route", epochs=-1),
]
