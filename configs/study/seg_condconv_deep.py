# Issue #26 placement: timm's CondConv2d in the deep backbone stages (the down convolutions of stages 3-4, where
# demo_seg_pce.py has experts) of the dense twin.
_base_ = ["../demo_seg_dense.py"]
model = dict(condconv=[dict(
    target=["net.encoder.backbone.stages.2.down.0", "net.encoder.backbone.stages.3.down.0"], num_experts=4)])
