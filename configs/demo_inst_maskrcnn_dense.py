# The dense twin of configs/demo_inst_maskrcnn_pce.py: same recipe, no routing.
#   python tools/train.py configs/demo_inst_maskrcnn_dense.py
_base_ = ["demo_inst_maskrcnn_pce.py"]
model = dict(backbone="dense_tiny", backbone_overrides=dict(_delete_=True))
phases = [dict(name="train", epochs=-1)]
