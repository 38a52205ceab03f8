# Issue #26, the proposal's third phase (as configs/study/seg_deep_attention.py): configs/demo_camelyon_seg_pce.py
# with deformable attention between layers in stage 3, off while the experts are shared and routed, switched on for
# the last phase with the keys' training.
_base_ = ["../demo_camelyon_seg_pce.py"]
model = dict(backbone_overrides=dict(stages=[
    dict(channels=32, depth=1, patch_size=16, stride=1, layer="dense"),
    dict(channels=64, depth=1, patch_size=8, stride=2, layer="dense"),
    dict(channels=128, depth=1, patch_size=4, stride=2, attention=True),
    dict(channels=256, depth=1, patch_size=2, stride=2),
]))
phases = [
    dict(name="shared", epochs=6, router_override="shared", keys_trainable=False, attention=False),
    dict(name="route", epochs=2, upcycle=True, keys_trainable=False, attention=False),
    dict(name="finetune", epochs=-1, keys_trainable=True, attention=True),
]
