# PCE classifier on Fashion-MNIST, 30 epochs in three phases (stabilise 2, route 8, finetune 20).
#   python tools/train.py configs/fmnist_cls_pce.py
_base_ = [
    "_base_/models/pce_fmnist.py",
    "_base_/datasets/fmnist.py",
    "_base_/schedules/sgd_cosine_30e.py",
    "_base_/schedules/pce_phases.py",
    "_base_/default_runtime.py",
]
runtime = dict(ema=0.999)
