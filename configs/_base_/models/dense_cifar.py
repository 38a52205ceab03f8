# The dense twin of pce_cifar.
_base_ = ["./pce_cifar.py"]
model = dict(backbone="dense_cifar")
