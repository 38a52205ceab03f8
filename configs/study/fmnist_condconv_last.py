# Issue #26 placement: timm's CondConv2d at fmnist_cls_patchmoe.py's place (the last stage's down convolution,
# just before the SPP + FC head) of the dense twin configs/fmnist_cls_dense.py.
_base_ = ["../fmnist_cls_dense.py"]
model = dict(condconv=[dict(target="backbone.stages.2.down.0", num_experts=4)])
