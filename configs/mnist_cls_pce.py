# PCE classifier on MNIST (same model and phases as Fashion-MNIST, 20 epochs).
_base_ = [
    "_base_/models/pce_fmnist.py",
    "_base_/datasets/mnist.py",
    "_base_/schedules/sgd_cosine_30e.py",
    "_base_/schedules/pce_phases.py",
    "_base_/default_runtime.py",
]
schedule = dict(epochs=20)
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=5, router_override=None, keys_trainable=False),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True),
]
