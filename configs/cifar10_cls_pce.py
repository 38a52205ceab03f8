# PCE classifier on CIFAR-10, 100 epochs: stabilise 5, route 25, finetune 70 (keys trainable, lr x0.5).
_base_ = [
    "_base_/models/pce_cifar.py",
    "_base_/datasets/cifar10.py",
    "_base_/schedules/sgd_cosine_100e.py",
    "_base_/schedules/pce_phases.py",
    "_base_/default_runtime.py",
]
phases = [
    dict(name="stabilise", epochs=5, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=25, router_override=None, keys_trainable=False),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True, lr_mult=0.5),
]
runtime = dict(ema=0.9995, amp="bf16", channels_last=True)
