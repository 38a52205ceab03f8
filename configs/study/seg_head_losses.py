# Issue #26, the proposal's own losses at the PatchConvMoE place: configs/demo_seg_patchmoe.py (one PCEConv2d at the
# decoder's last convolution) with the confidence loss (per-patch routing entropy, minimised) and the anti-collapse
# surrogate switched on (weight 0 in every shipped config).
#   python tools/train.py configs/study/seg_head_losses.py --seed 0
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(router_loss_weights=dict(entropy=0.01, collapse=0.1))
