# PCE encoder + segmentation-models-pytorch FPN decoder on the built-in demo data.
#   python tools/train.py configs/demo_seg_pce.py
_base_ = ["_base_/datasets/demo_voc_seg.py", "_base_/default_runtime.py"]
task = "segmentation"
model = dict(
    backbone="pce_tiny",
    num_classes=5,  # background + 4 demo classes
    backbone_overrides=dict(num_experts=4, top_k=1, halo=1),  # 1 px of neighbour context per patch
    head=dict(arch="FPN", decoder=dict(decoder_pyramid_channels=64, decoder_segmentation_channels=32)),
    input_shape=(3, 128, 128),
)
optimizer = dict(type="adamw", lr=2e-3, weight_decay=1e-4, grad_clip=10.0)
schedule = dict(epochs=32, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=10, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=10)
eval = dict(metric="mIoU", mode="max")
