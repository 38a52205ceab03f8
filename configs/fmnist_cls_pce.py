# PCE classifier on Fashion-MNIST: the budget recipe of docs/RESULTS.md (12 epochs, AdamW, cosine).
#   python tools/train.py configs/fmnist_cls_pce.py --seed 0
# Phases: 1 epoch of stabilisation (each patch to one random expert), then learned cosine routing with
# K-Means-initialised, EMA-updated keys, then trainable keys for the rest.
_base_ = [
    "_base_/models/pce_fmnist.py",
    "_base_/datasets/fmnist.py",
    "_base_/schedules/adamw_cosine_12e.py",
    "_base_/default_runtime.py",
]
model = dict(label_smoothing=0.1)
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False, attention=False),
    dict(name="route", epochs=3, router_override=None, keys_trainable=False),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True),
]
data = dict(num_workers=1)
runtime = dict(ema=0.999, num_threads=2, log_interval=50, eval_interval=3)
