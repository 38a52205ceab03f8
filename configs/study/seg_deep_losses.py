# Issue #26, the proposal's own losses never run on data: configs/demo_seg_pce.py (experts in stages 3-4) with the
# seeds' confidence loss (per-patch routing entropy, minimised) and the anti-collapse surrogate switched on
# (weight 0 in every shipped config; pce/moe/losses.py defines both).
#   python tools/train.py configs/study/seg_deep_losses.py --seed 0
_base_ = ["../demo_seg_pce.py"]
model = dict(router_loss_weights=dict(entropy=0.01, collapse=0.1))
