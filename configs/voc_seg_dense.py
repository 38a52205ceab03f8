# The dense twin of configs/voc_seg_pce.py: same recipe, no routing.
#   python tools/train.py configs/voc_seg_dense.py
_base_ = ["voc_seg_pce.py"]
model = dict(backbone="dense_small", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
