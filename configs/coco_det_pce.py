# PCE Faster R-CNN + FPN on COCO-format data (COCO 2017, or your own COCO JSON: see _base_/datasets/coco_det.py).
#   python tools/train.py configs/coco_det_pce.py
#   python tools/train.py configs/coco_det_pce.py --cfg-options data.root=data/mine \
#       data.train.kwargs.ann_file=annotations/train.json data.train.kwargs.img_dir=images \
#       data.val.kwargs.ann_file=annotations/val.json data.val.kwargs.img_dir=images model.num_classes=4
# The backbone trains from scratch (no ImageNet weights): the schedule is an untuned starting point.
_base_ = ["_base_/datasets/coco_det.py", "_base_/default_runtime.py"]
task = "detection"
model = dict(
    backbone="pce_small",
    num_classes=81,  # 80 COCO categories + background
    head=dict(fpn_channels=256, representation_size=1024, min_size=600, max_size=1000, anchor_scale=8,
              box_score_thresh=0.01, box_detections_per_img=100),
    input_shape=(3, 600, 600),
)
optimizer = dict(type="adamw", lr=2e-4, weight_decay=0.05, grad_clip=10.0)
schedule = dict(epochs=12, lr_scheduler=dict(type="cosine", warmup_epochs=1.0, warmup_factor=0.01, min_lr_factor=0.01))
phases = [
    dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
    dict(name="route", epochs=4, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=50)
eval = dict(metric="mAP", mode="max")  # COCO AP@[.5:.95]; AP50 / AP75 are logged too
