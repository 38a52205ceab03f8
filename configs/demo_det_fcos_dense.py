# The dense twin of configs/demo_det_fcos_pce.py: same recipe, no routing.
#   python tools/train.py configs/demo_det_fcos_dense.py
_base_ = ["demo_det_fcos_pce.py"]
model = dict(backbone="dense_tiny", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
