# The three PCE phases (use with a schedule; the last phase takes the remaining epochs):
#   1. stabilise: uniform routing, keys frozen, attention off, so the experts learn before routing matters;
#   2. route: learned cosine routers (keys K-Means-initialised on real patches, then EMA-updated);
#   3. finetune: keys trained by the optimizer, attention on.
phases = [
    dict(name="stabilise", epochs=2, router_override="uniform", keys_trainable=False, attention=False, lr_mult=1.0),
    dict(name="route", epochs=8, router_override=None, keys_trainable=False, attention=False, lr_mult=1.0),
    dict(name="finetune", epochs=-1, router_override=None, keys_trainable=True, attention=True, lr_mult=1.0),
]
