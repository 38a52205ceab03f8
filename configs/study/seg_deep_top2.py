# Issue #26 routing, experts in the deep stages (configs/demo_seg_pce.py): top-2 instead of top-1 (execution="map":
# context execution allows one expert per patch; "map" keeps experts reading across patch borders, top-2 of E run).
_base_ = ["../demo_seg_pce.py"]
model = dict(backbone_overrides=dict(top_k=2, execution="map"))
