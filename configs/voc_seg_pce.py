# PCE encoder + segmentation-models-pytorch FPN decoder on PASCAL VOC 2012: train -> val, 21 classes.
#   python tools/train.py configs/voc_seg_pce.py          # expects data/VOCdevkit/VOC2012
# The encoder trains from scratch (no ImageNet weights): the schedule is an untuned starting point.
_base_ = ["_base_/datasets/voc12_seg.py", "_base_/default_runtime.py"]
task = "segmentation"
model = dict(
    backbone="pce_small",
    num_classes=21,  # background + 20 VOC classes
    # smp's FPN defaults (256 pyramid / 128 segmentation channels); whole-image evaluation (VOC images <= 500 px)
    head=dict(arch="FPN", decoder=dict(decoder_pyramid_channels=256, decoder_segmentation_channels=128),
              inference="whole"),
    input_shape=(3, 512, 512),
)
optimizer = dict(type="adamw", lr=6e-4, weight_decay=0.01, grad_clip=10.0)
schedule = dict(epochs=100, lr_scheduler=dict(type="cosine", warmup_epochs=2.0, warmup_factor=0.01, min_lr_factor=0.01))
phases = [
    dict(name="stabilise", epochs=5, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=25, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=50)
eval = dict(metric="mIoU", mode="max")
