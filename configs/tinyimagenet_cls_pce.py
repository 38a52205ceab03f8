# PCE classifier on Tiny ImageNet (64x64, 200 classes), AdamW 100 epochs; deformable attention (stage 3)
# is switched on in the finetune phase.
_base_ = [
    "_base_/models/pce_tiny.py",
    "_base_/datasets/tinyimagenet.py",
    "_base_/schedules/adamw_cosine_100e.py",
    "_base_/schedules/pce_phases.py",
    "_base_/default_runtime.py",
]
phases = [
    dict(name="stabilise", epochs=5, router_override="uniform", keys_trainable=False, attention=False),
    dict(name="route", epochs=25, router_override=None, keys_trainable=False, attention=False),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True, attention=True),
]
runtime = dict(ema=0.9998, amp="bf16", channels_last=True, log_interval=50)
