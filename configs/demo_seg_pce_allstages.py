# configs/demo_seg_pce.py with experts in all four stages (the previous recipe, kept for the comparison in
# docs/RESULTS.md): every stage routes its 2x2 patch grid to 4 experts.
#   python tools/train.py configs/demo_seg_pce_allstages.py
_base_ = ["demo_seg_pce.py"]
model = dict(backbone_overrides=dict(stages=[
    dict(channels=32, depth=1, patch_size=16, stride=1),
    dict(channels=64, depth=1, patch_size=8, stride=2),
    dict(channels=128, depth=1, patch_size=4, stride=2),
    dict(channels=256, depth=1, patch_size=2, stride=2),
]))
