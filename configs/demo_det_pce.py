# PCE Faster R-CNN on the built-in demo data (the README's `make demo`).
#   python tools/train.py configs/demo_det_pce.py
_base_ = ["_base_/models/frcnn_demo.py", "_base_/datasets/demo_voc_det.py", "_base_/default_runtime.py"]
optimizer = dict(type="adamw", lr=1e-3, weight_decay=1e-4, grad_clip=10.0)
schedule = dict(epochs=24, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
# 1 epoch of stabilisation (one random expert per patch), then learned routing with K-Means keys,
# then trainable keys.
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=7, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=10)
eval = dict(metric="AP50", mode="max")
