# The dense twin of fmnist_cls_pce.py (same stem, stages and expert block, no routing), same recipe.
#   python tools/train.py configs/fmnist_cls_dense.py --seed 0
_base_ = [
    "_base_/models/dense_fmnist.py",
    "_base_/datasets/fmnist.py",
    "_base_/schedules/adamw_cosine_12e.py",
    "_base_/default_runtime.py",
]
model = dict(label_smoothing=0.1)
data = dict(num_workers=1)
runtime = dict(ema=0.999, num_threads=2, log_interval=50, eval_interval=3)
