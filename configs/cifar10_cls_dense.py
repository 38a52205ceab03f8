# The dense twin of cifar10_cls_pce.py (same stem, stages and expert block, no routing), same recipe
# (including the finetune phase's lr x0.5 from epoch 31).
#   python tools/train.py configs/cifar10_cls_dense.py
_base_ = ["cifar10_cls_pce.py"]
model = dict(backbone="dense_cifar")
phases = [
    dict(name="train", epochs=30),
    dict(name="finetune", epochs=-1, lr_mult=0.5),
]
