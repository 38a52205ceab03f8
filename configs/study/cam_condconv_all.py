# Issue #26 placement, Camelyon demo: timm's CondConv2d in every stage (the down convolutions of stages 2-4 and
# the stem's two) of the dense twin configs/demo_camelyon_seg_dense.py.
_base_ = ["../demo_camelyon_seg_dense.py"]
model = dict(condconv=[dict(
    target=["net.encoder.backbone.stem.*", "net.encoder.backbone.stages.*.down.0"], num_experts=4)])
