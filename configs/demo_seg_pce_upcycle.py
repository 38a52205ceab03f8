# configs/demo_seg_pce.py with sparse upcycling: the experts first train as one shared block (every patch to
# expert 0, the cost of one expert), then expert 0 is copied into all experts and the learned routers take over.
#   python tools/train.py configs/demo_seg_pce_upcycle.py
_base_ = ["demo_seg_pce.py"]
phases = [
    dict(name="shared", epochs=8, router_override="shared", keys_trainable=False),
    dict(name="route", epochs=8, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
