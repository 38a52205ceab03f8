# The demo detectors' recipe (Faster R-CNN's, shared by RetinaNet / FCOS / Mask R-CNN on the 128 px demo data):
# AdamW, 24 epochs of cosine lr; stabilise with one random expert per patch, learned routing on K-Means keys,
# then trainable keys.
optimizer = dict(type="adamw", lr=1e-3, weight_decay=1e-4, grad_clip=10.0)
schedule = dict(epochs=24, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=7, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=10)
eval = dict(metric="AP50", mode="max")
