# The dense twin of configs/coco_det_pce.py: same recipe, no routing.
#   python tools/train.py configs/coco_det_dense.py
_base_ = ["coco_det_pce.py"]
model = dict(backbone="dense_small", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
