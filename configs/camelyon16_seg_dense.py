# The dense twin of configs/camelyon16_seg_pce.py: same recipe, no routing.
_base_ = ["camelyon16_seg_pce.py"]
model = dict(backbone="dense_small", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
