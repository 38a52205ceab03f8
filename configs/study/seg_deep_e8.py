# Issue #26 routing, experts in the deep stages (configs/demo_seg_pce.py): E = 8 experts instead of 4.
_base_ = ["../demo_seg_pce.py"]
model = dict(backbone_overrides=dict(num_experts=8))
