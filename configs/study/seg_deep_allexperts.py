# Issue #26 stabilisation, experts in the deep stages: the first phase runs all experts summed (router_override=
# "all_experts", reduce="sum") instead of "shared" (expert 0) followed by upcycling.
_base_ = ["../demo_seg_pce.py"]
phases = [
    dict(name="stabilise", epochs=16, router_override="all_experts", router_override_kwargs=dict(reduce="sum"),
         keys_trainable=False),
    dict(name="route", epochs=6, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
