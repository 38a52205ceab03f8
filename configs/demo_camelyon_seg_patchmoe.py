# PatchConvMoE on the generated Camelyon slides: the dense twin configs/demo_camelyon_seg_dense.py (dense_tiny
# encoder + smp FPN, 128 px tiles of level 1, same recipe) with ONE pce.PCEConv2d in place of the decoder's last
# convolution, the segmentation head's 1x1 classifier (net.segmentation_head.0, 32 -> 2 channels on the 32 x 32
# map): 4 expert kernels, a 3 x 3 grid of patches, top-2, the gap_conv gate. Compare with the dense twin.
#   python tools/train.py configs/demo_camelyon_seg_patchmoe.py
#   python tools/infer_slide.py configs/demo_camelyon_seg_patchmoe.py \
#       --checkpoint work_dirs/demo_camelyon_seg_patchmoe/best.pth data/demo_camelyon/testing/images/test_001.tif \
#       --out out/heatmap_patchmoe
# Every other weight starts as the dense twin's (the conversion runs after the dense model is built). Sparse
# upcycling: the first half routes every patch to expert 0, then expert 0 is copied into every expert and the
# learned gate takes over.
_base_ = ["demo_camelyon_seg_dense.py"]
model = dict(
    convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                  execution="context", noise=0.0)],
)
phases = [
    dict(name="shared", epochs=6, router_override="shared"),
    dict(name="route", epochs=-1, upcycle=True),
]
