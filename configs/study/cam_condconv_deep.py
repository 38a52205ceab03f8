# Issue #26 placement, Camelyon demo: timm's CondConv2d in the deep backbone stages (the down convolutions of
# stages 3-4, where demo_camelyon_seg_pce.py has experts) of the dense twin configs/demo_camelyon_seg_dense.py.
_base_ = ["../demo_camelyon_seg_dense.py"]
model = dict(condconv=[dict(
    target=["net.encoder.backbone.stages.2.down.0", "net.encoder.backbone.stages.3.down.0"], num_experts=4)])
