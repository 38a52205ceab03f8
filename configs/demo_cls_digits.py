# Demo: a small PCE classifier on scikit-learn's bundled digits (no download), upsampled to 16x16.
# Trains in well under a minute on 2 CPU cores:  python tools/train.py configs/demo_cls_digits.py
# The pce_fmnist preset (1 input channel) with smaller stages and patch sizes for 16x16 inputs:
# maps 16 -> 8 -> 4 with 4x4, 2x2 and 2x2 patch grids, 4 experts, top-1 cosine routing.
_base_ = [
    "_base_/models/pce_fmnist.py",
    "_base_/datasets/digits.py",
    "_base_/default_runtime.py",
]
model = dict(
    backbone_overrides=dict(
        stem_channels=16,
        stages=[
            dict(channels=24, depth=1, patch_size=4, stride=1),
            dict(channels=48, depth=1, patch_size=4, stride=2),
            dict(channels=64, depth=1, patch_size=2, stride=2),
        ],
    ),
    input_shape=(1, 16, 16),
)
optimizer = dict(type="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, grad_clip=5.0)
schedule = dict(epochs=8, lr_scheduler=dict(type="cosine", warmup_epochs=0.5, warmup_factor=0.05))
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False, attention=False),
    dict(name="route", epochs=3, router_override=None, keys_trainable=False),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True),
]
# One CPU thread: small convolutions gain little from a second thread, and on a busy machine torch's spinning
# thread pool costs far more than it gains.
runtime = dict(work_dir="work_dirs/demo_cls_digits", num_threads=1, log_interval=20, kmeans_init_batches=8)
