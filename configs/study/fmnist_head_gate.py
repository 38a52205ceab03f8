# Issue #26 routing, PatchConvMoE on the last stage (configs/fmnist_cls_patchmoe.py):
# the pooled-MLP gate instead of the gap_conv gate.
_base_ = ["../fmnist_cls_patchmoe.py"]
model = dict(convert=[dict(target="backbone.stages.2.*", num_experts=4, top_k=2, grid=2, router="gate",
                           execution="context", noise=0.0)])
