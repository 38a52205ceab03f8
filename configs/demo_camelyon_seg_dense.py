# The dense twin of configs/demo_camelyon_seg_pce.py: same recipe, no routing.
#   python tools/train.py configs/demo_camelyon_seg_dense.py
_base_ = ["demo_camelyon_seg_pce.py"]
model = dict(backbone="dense_tiny", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
