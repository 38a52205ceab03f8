# SGD + momentum, lr x0.1 at epochs 20 and 27.
optimizer = dict(type="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
schedule = dict(epochs=30, lr_scheduler=dict(type="multistep", milestones=[20, 27], gamma=0.1, warmup_epochs=0.5))
