# Issue #26, the proposal's third phase never run on data: configs/demo_seg_pce.py (experts in stages 3-4) with
# deformable attention between layers in stage 3 (the PCE proposal's "attention" block), off while the experts
# are shared and routed, switched on for the last phase with the keys' training.
#   python tools/train.py configs/study/seg_deep_attention.py --seed 0
_base_ = ["../demo_seg_pce.py"]
model = dict(backbone_overrides=dict(stages=[
    dict(channels=32, depth=1, patch_size=16, stride=1, layer="dense"),
    dict(channels=64, depth=1, patch_size=8, stride=2, layer="dense"),
    dict(channels=128, depth=1, patch_size=4, stride=2, attention=True),
    dict(channels=256, depth=1, patch_size=2, stride=2),
]))
phases = [
    dict(name="shared", epochs=16, router_override="shared", keys_trainable=False, attention=False),
    dict(name="route", epochs=6, upcycle=True, keys_trainable=False, attention=False),
    dict(name="finetune", epochs=-1, keys_trainable=True, attention=True),
]
