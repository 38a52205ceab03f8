# PCE classifier on Fashion-MNIST: the budget recipe of docs/RESULTS.md (12 epochs, AdamW, cosine).
#   python tools/train.py configs/fmnist_cls_pce.py --seed 0
# Phases (sparse upcycling): 4 epochs with every patch sent to expert 0 (the experts train as one shared block,
# at the cost of one expert), then expert 0 is copied into all 4 experts and learned cosine routing takes over
# (keys K-Means-initialised, EMA-updated for 2 epochs, then trainable).
# Measured (docs/RESULTS.md, issue #26 finals, 5 seeds): top-1 0.9353 +- 0.0006, below its dense twin
# configs/fmnist_cls_dense.py (0.9378 +- 0.0011; -0.0025, Welch p = 0.005): use this config to study routing.
_base_ = [
    "_base_/models/pce_fmnist.py",
    "_base_/datasets/fmnist.py",
    "_base_/schedules/adamw_cosine_12e.py",
    "_base_/default_runtime.py",
]
model = dict(label_smoothing=0.1)
phases = [
    dict(name="shared", epochs=4, router_override="shared", keys_trainable=False, attention=False),
    dict(name="route", epochs=2, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
data = dict(num_workers=1)
runtime = dict(ema=0.999, num_threads=2, log_interval=50, eval_interval=3)
