# Issue #26, the proposal's own losses (as configs/study/seg_deep_losses.py): configs/demo_camelyon_seg_pce.py with
# the confidence loss (routing entropy, weight 0.01) and the anti-collapse surrogate (0.1) switched on.
_base_ = ["../demo_camelyon_seg_pce.py"]
model = dict(router_loss_weights=dict(entropy=0.01, collapse=0.1))
