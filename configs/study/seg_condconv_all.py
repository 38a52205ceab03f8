# Issue #26 placement: timm's CondConv2d in every stage (the down convolutions of stages 2-4 and the stem's two)
# of the dense twin.
_base_ = ["../demo_seg_dense.py"]
model = dict(condconv=[dict(
    target=["net.encoder.backbone.stem.*", "net.encoder.backbone.stages.*.down.0"], num_experts=4)])
