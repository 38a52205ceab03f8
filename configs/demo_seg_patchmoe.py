# PatchConvMoE on the demo segmentation data: the dense twin configs/demo_seg_dense.py (dense_tiny encoder + smp
# FPN, same recipe) with ONE pce.PCEConv2d in place of the decoder's last convolution, the segmentation head's
# 1x1 classifier (net.segmentation_head.0, 32 -> 5 channels on the 32 x 32 map of a 128 px image): 4 expert kernels,
# a 3 x 3 grid of patches, top-2, the gap_conv gate (PatchConvMoE, arXiv 2604.13761). Compare with the dense twin.
#   python tools/train.py configs/demo_seg_patchmoe.py
#   python tools/visualize_routing.py configs/demo_seg_patchmoe.py \
#       --checkpoint work_dirs/demo_seg_patchmoe/best.pth --split val --num 8 --out vis/demo_seg_patchmoe
# The conversion runs after the dense model is built, so every other weight starts as the dense twin's.
# Sparse upcycling as in configs/demo_seg_pce.py: the first half routes every patch to expert 0 (the head is the
# dense twin's classifier), then expert 0 is copied into every expert and the learned gate takes over.
_base_ = ["demo_seg_dense.py"]
model = dict(
    convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                  execution="context", noise=0.0)],
)
phases = [
    dict(name="shared", epochs=16, router_override="shared"),
    dict(name="route", epochs=-1, upcycle=True),
]
