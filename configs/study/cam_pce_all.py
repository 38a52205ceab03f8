# Issue #26 placement, Camelyon demo: configs/demo_camelyon_seg_pce.py with experts in all four stages (as
# configs/demo_seg_pce_allstages.py on the segmentation demo): every stage routes its patch grid to 4 experts.
_base_ = ["../demo_camelyon_seg_pce.py"]
model = dict(backbone_overrides=dict(stages=[
    dict(channels=32, depth=1, patch_size=16, stride=1),
    dict(channels=64, depth=1, patch_size=8, stride=2),
    dict(channels=128, depth=1, patch_size=4, stride=2),
    dict(channels=256, depth=1, patch_size=2, stride=2),
]))
