# SGD + momentum, 1 warmup epoch then cosine over 30 epochs.
optimizer = dict(type="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, grad_clip=5.0)
schedule = dict(epochs=30, lr_scheduler=dict(type="cosine", warmup_epochs=1.0, warmup_factor=0.01, min_lr_factor=0.0))
