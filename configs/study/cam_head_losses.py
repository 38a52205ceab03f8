# Issue #26, the proposal's own losses at the PatchConvMoE head (configs/demo_camelyon_seg_patchmoe.py): the
# confidence loss (weight 0.01) and the anti-collapse surrogate (0.1) switched on.
_base_ = ["../demo_camelyon_seg_patchmoe.py"]
model = dict(router_loss_weights=dict(entropy=0.01, collapse=0.1))
