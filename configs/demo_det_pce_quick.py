# The quick recipe of `make demo` (tools/demo.py): configs/demo_det_pce.py for 4 epochs of 50 iterations
# (200 steps of 8 images, about 1.5 CPU-minutes; val AP50 about 0.5). tools/demo.py --full trains longer.
#   python tools/train.py configs/demo_det_pce_quick.py
_base_ = ["demo_det_pce.py"]
schedule = dict(epochs=4, iters_per_epoch=50)
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=1, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(log_interval=50, tensorboard=False)
