# Issue #26 routing, PatchConvMoE on the last stage (configs/fmnist_cls_patchmoe.py):
# a soft per-sample mixture (one cell per image, every expert: top_k=None) instead of top-2 over 2x2.
_base_ = ["../fmnist_cls_patchmoe.py"]
model = dict(convert=[dict(target="backbone.stages.2.*", num_experts=4, top_k=None, grid=1, router="gap_conv",
                           execution="context", noise=0.0)])
