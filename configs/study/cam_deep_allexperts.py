# Issue #26 stabilisation, experts in the deep stages (configs/demo_camelyon_seg_pce.py): the first phase runs all
# experts summed (router_override="all_experts", reduce="sum") instead of "shared" (expert 0) followed by upcycling.
_base_ = ["../demo_camelyon_seg_pce.py"]
phases = [
    dict(name="stabilise", epochs=6, router_override="all_experts", router_override_kwargs=dict(reduce="sum"),
         keys_trainable=False),
    dict(name="route", epochs=2, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
