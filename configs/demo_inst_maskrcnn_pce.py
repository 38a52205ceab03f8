# PCE Mask R-CNN (instance segmentation) on the built-in demo data: per-object masks from SegmentationObject,
# box AP and COCO mask AP (segm_*) in the evaluation.
#   python tools/train.py configs/demo_inst_maskrcnn_pce.py
_base_ = ["_base_/datasets/demo_voc_det.py", "_base_/default_runtime.py", "_base_/schedules/demo_det_phased.py"]
task = "detection"
model = dict(
    backbone="pce_tiny",
    num_classes=5,  # 4 demo classes + background
    backbone_overrides=dict(num_experts=4, top_k=1),
    head=dict(arch="mask_rcnn", fpn_channels=64, representation_size=256, mask_layers=(64, 64, 64, 64),
              min_size=128, max_size=128, anchor_scale=4,
              rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
              rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=128),
    input_shape=(3, 128, 128),
)
# masks=True: target["masks"] uint8 [N, H, W]; the ids come from ImageSets/Segmentation
data = dict(train=dict(kwargs=dict(masks=True)), val=dict(kwargs=dict(masks=True)))
eval = dict(metric="segm_AP50", mode="max")  # COCO mask AP50 picks best.pth
