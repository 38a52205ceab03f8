# SGD + momentum, 2 warmup epochs then cosine over 100 epochs.
_base_ = ["./sgd_cosine_30e.py"]
optimizer = dict(lr=0.1)
schedule = dict(epochs=100, lr_scheduler=dict(warmup_epochs=2.0))
