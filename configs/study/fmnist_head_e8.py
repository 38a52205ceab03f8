# Issue #26 routing, PatchConvMoE on the last stage (configs/fmnist_cls_patchmoe.py):
# E = 8 expert kernels instead of 4.
_base_ = ["../fmnist_cls_patchmoe.py"]
model = dict(convert=[dict(target="backbone.stages.2.*", num_experts=8, top_k=2, grid=2, router="gap_conv",
                           execution="context", noise=0.0)])
