# The dense twin of fmnist_cls_pce.py (no routing: no phases needed) for comparisons at equal active FLOPs.
_base_ = [
    "_base_/models/dense_fmnist.py",
    "_base_/datasets/fmnist.py",
    "_base_/schedules/sgd_cosine_30e.py",
    "_base_/default_runtime.py",
]
runtime = dict(ema=0.999)
