# AdamW, 3 warmup epochs then cosine over 100 epochs.
optimizer = dict(type="adamw", lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05, grad_clip=5.0)
schedule = dict(epochs=100, lr_scheduler=dict(type="cosine", warmup_epochs=3.0, warmup_factor=0.01,
                                              min_lr_factor=0.01))
