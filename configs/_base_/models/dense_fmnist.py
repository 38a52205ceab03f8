# The dense twin of pce_fmnist (same stem, stages and expert block, no routing).
_base_ = ["./pce_fmnist.py"]
model = dict(backbone="dense_fmnist")
