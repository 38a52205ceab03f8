# Issue #26 routing, PatchConvMoE on the last stage (configs/fmnist_cls_patchmoe.py):
# top-1 instead of top-2.
_base_ = ["../fmnist_cls_patchmoe.py"]
model = dict(convert=[dict(target="backbone.stages.2.*", num_experts=4, top_k=1, grid=2, router="gap_conv",
                           execution="context", noise=0.0)])
