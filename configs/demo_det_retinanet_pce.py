# PCE RetinaNet (torchvision's: focal loss, last 3 stages + P6/P7 FPN levels) on the built-in demo data.
#   python tools/train.py configs/demo_det_retinanet_pce.py
_base_ = ["_base_/datasets/demo_voc_det.py", "_base_/default_runtime.py", "_base_/schedules/demo_det_phased.py"]
task = "detection"
model = dict(
    backbone="pce_tiny",
    num_classes=5,  # 4 demo classes + background (RetinaNet never predicts label 0)
    backbone_overrides=dict(num_experts=4, top_k=1),
    # anchors 4 x stride x 2^(k/3) on strides 8 .. 128 (pce.tasks.detection.heads); 128 px images on a CPU
    head=dict(arch="retinanet", fpn_channels=64, min_size=128, max_size=128, score_thresh=0.05,
              topk_candidates=300, detections_per_img=100),
    input_shape=(3, 128, 128),
)
