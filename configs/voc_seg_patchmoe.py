# PatchConvMoE on PASCAL VOC 2012 segmentation: the dense twin configs/voc_seg_dense.py (dense_small encoder + smp
# FPN, train -> val, 21 classes, same recipe) with ONE pce.PCEConv2d in place of the decoder's last convolution,
# the segmentation head's 1x1 classifier (net.segmentation_head.0, 128 -> 21 channels on the 128 x 128 map of a
# 512 px crop): 4 expert kernels, a 3 x 3 grid of patches, top-2, the gap_conv gate. Compare with the dense twin.
#   python tools/train.py configs/voc_seg_patchmoe.py          # expects data/VOCdevkit/VOC2012
# Every other weight starts as the dense twin's (the conversion runs after the dense model is built). Sparse
# upcycling: the first 30 epochs route every patch to expert 0 (the head is the dense twin's classifier), then
# expert 0 is copied into every expert and the learned gate takes over. An untuned starting point, like the twin.
_base_ = ["voc_seg_dense.py"]
model = dict(
    convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                  execution="context", noise=0.0)],
)
phases = [
    dict(name="shared", epochs=30, router_override="shared"),
    dict(name="route", epochs=-1, upcycle=True),
]
