# Issue #26 placement: timm's CondConv2d in every stage (the stem and every down convolution) of the dense twin.
_base_ = ["../fmnist_cls_dense.py"]
model = dict(condconv=[dict(target=["backbone.stem.0.0", "backbone.stages.*.down.0"], num_experts=4)])
