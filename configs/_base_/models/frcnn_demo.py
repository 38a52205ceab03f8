# Faster R-CNN + FPN on a PCE backbone, sized for 128 px images on a CPU.
task = "detection"
model = dict(
    backbone="pce_tiny",
    num_classes=5,  # 4 demo classes + background
    backbone_overrides=dict(num_experts=4, top_k=1),
    head=dict(fpn_channels=64, representation_size=256, min_size=128, max_size=128, anchor_scale=4,
              rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
              rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=128),
    input_shape=(3, 128, 128),
)
