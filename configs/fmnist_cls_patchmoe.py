# pce.convert on a classifier: the dense twin configs/fmnist_cls_dense.py (dense_fmnist, same recipe) with its last
# stage's plain convolutions replaced by pce.PCEConv2d (target "backbone.stages.2.*": the stride-2 3x3
# downsampling convolution backbone.stages.2.down.0, 96 -> 192 channels, 7 x 7 -> 4 x 4; the stage's other
# convolutions are stacked expert kernels or PointwiseConv, not plain nn.Conv2d, and are left as they are):
# 4 expert kernels, a 2 x 2 grid of 2 x 2 patches on the 4 x 4 output, top-2, the gap_conv gate.
#   python tools/train.py configs/fmnist_cls_patchmoe.py --seed 0
#   python tools/analyze_routing.py configs/fmnist_cls_patchmoe.py \
#       --checkpoint work_dirs/fmnist_cls_patchmoe/best.pth --split val --out analysis/fmnist_patchmoe
# Every other weight starts as the dense twin's. Sparse upcycling as in configs/fmnist_cls_pce.py: 4 epochs with
# every patch sent to expert 0, then expert 0 is copied into every expert (the EMA copy too) and the gate routes.
# Measured (docs/RESULTS.md, issue #26 finals, 5 seeds): top-1 0.9375 +- 0.0012, a tie with the dense twin
# (0.9378 +- 0.0011; -0.0003, Welch p = 0.67).
_base_ = ["fmnist_cls_dense.py"]
model = dict(
    convert=[dict(target="backbone.stages.2.*", num_experts=4, top_k=2, grid=2, router="gap_conv",
                  execution="context", noise=0.0)],
)
phases = [
    dict(name="shared", epochs=4, router_override="shared"),
    dict(name="route", epochs=-1, upcycle=True),
]
