# Issue #26 placement: timm's CondConv2d at PatchConvMoE's place (the head's classifier net.segmentation_head.0)
# of the dense twin configs/demo_camelyon_seg_dense.py.
_base_ = ["../demo_camelyon_seg_dense.py"]
model = dict(condconv=[dict(target="net.segmentation_head.0", num_experts=4)])
