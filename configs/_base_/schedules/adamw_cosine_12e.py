# AdamW, half an epoch of warmup then cosine over 12 epochs: the Fashion-MNIST budget recipe
# (<= 20 min of CPU on 2 cores for pce_fmnist and dense_fmnist alike).
optimizer = dict(type="adamw", lr=2e-3, weight_decay=0.05, grad_clip=5.0)
schedule = dict(epochs=12, lr_scheduler=dict(type="cosine", warmup_epochs=0.5, warmup_factor=0.01, min_lr_factor=0.0))
