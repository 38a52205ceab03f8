# The dense twin of tinyimagenet_cls_pce.py (same stem, stages, expert block and deformable attention in
# stage 3, no routing), same recipe: attention switched on from epoch 31 as in the PCE run's finetune phase.
#   python tools/train.py configs/tinyimagenet_cls_dense.py
_base_ = ["tinyimagenet_cls_pce.py"]
model = dict(backbone="dense_tiny")
phases = [
    dict(name="train", epochs=30, attention=False),
    dict(name="finetune", epochs=-1, attention=True),
]
