# The dense twin of mnist_cls_pce.py (same stem, stages and expert block, no routing), same recipe.
#   python tools/train.py configs/mnist_cls_dense.py
_base_ = ["mnist_cls_pce.py"]
model = dict(backbone="dense_fmnist")
phases = [dict(name="train", epochs=-1)]
