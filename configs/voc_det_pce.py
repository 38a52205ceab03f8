# PCE Faster R-CNN + FPN on PASCAL VOC: VOC07+12 trainval -> VOC07 test (the standard protocol), ~600 px images.
#   python tools/train.py configs/voc_det_pce.py          # expects data/VOCdevkit/VOC2007 and VOC2012
# The backbone trains from scratch (no ImageNet weights): the schedule is an untuned starting point.
_base_ = ["_base_/datasets/voc0712_det.py", "_base_/default_runtime.py"]
task = "detection"
model = dict(
    backbone="pce_small",
    num_classes=21,  # 20 VOC classes + background
    # torchvision's FPN defaults: 256-channel pyramid, 1024-wide box head, shorter side 600 (longer <= 1000),
    # anchors 32..512 px (anchor_scale 8 x strides 4..64) with aspect ratios 0.5 / 1 / 2.
    head=dict(fpn_channels=256, representation_size=1024, min_size=600, max_size=1000, anchor_scale=8,
              box_score_thresh=0.01, box_detections_per_img=100),
    input_shape=(3, 600, 600),
)
optimizer = dict(type="adamw", lr=2e-4, weight_decay=0.05, grad_clip=10.0)
schedule = dict(epochs=24, lr_scheduler=dict(type="cosine", warmup_epochs=1.0, warmup_factor=0.01, min_lr_factor=0.01))
phases = [
    dict(name="stabilise", epochs=2, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=6, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=50)
eval = dict(metric="AP50_voc07", mode="max")  # VOC07 11-point AP50 on VOC2007 test; mAP / AP50 are logged too
