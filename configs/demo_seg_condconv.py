# CondConv at PatchConvMoE's place: the dense twin configs/demo_seg_dense.py with timm's CondConv2d (4 expert
# kernels mixed per image by sigmoid(Linear(GAP(x))), pce.models.condconv) in place of the decoder's last
# convolution, net.segmentation_head.0 -- the outside baseline of configs/demo_seg_patchmoe.py (same place, same
# experts, per-image instead of per-patch routing; upcycled from the dense convolution).
#   python tools/train.py configs/demo_seg_condconv.py
_base_ = ["demo_seg_dense.py"]
model = dict(condconv=[dict(target="net.segmentation_head.0", num_experts=4)])
