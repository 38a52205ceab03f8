# Issue #26 study plan, Fashion-MNIST: read by tools/run_study.py (the format: configs/study/plan_seg.py).
#   python tools/run_study.py configs/study/plan_fmnist.py --stage screen --dry-run
study = "study26_fmnist"
metric = "top1"
mode = "max"
reference = "dense"
baselines = ["dense", "condconv_all"]
experts_num = 1000          # the experts analysis on the first 1,000 test images
variants = dict(
    dense=dict(config="configs/fmnist_cls_dense.py"),
    # placement: the last stage's convolution (just before the SPP + FC head, which has no convolution)
    pce_last=dict(config="configs/fmnist_cls_patchmoe.py"),
    condconv_last=dict(config="configs/study/fmnist_condconv_last.py"),
    pce_all=dict(config="configs/fmnist_cls_pce.py"),                     # PCE layers in every stage
    condconv_all=dict(config="configs/study/fmnist_condconv_all.py"),
    pce_shrink=dict(config="configs/study/fmnist_pce_shrink.py"),         # footprints shrinking with depth
    # routing of the PCEConv2d
    head_top1=dict(config="configs/study/fmnist_head_top1.py"),
    head_e8=dict(config="configs/study/fmnist_head_e8.py"),
    head_cosine=dict(config="configs/study/fmnist_head_cosine.py"),
    head_gate=dict(config="configs/study/fmnist_head_gate.py"),
    head_soft=dict(config="configs/study/fmnist_head_soft.py"),
    # stop=False: at half (epoch 3) its EMA weights still average the summed-experts phase with the routed one
    # (0.33 top-1 then, against 0.60 for the dense twin, whose EMA is warming up too); run to the end instead
    head_allexperts=dict(config="configs/study/fmnist_head_allexperts.py", stop=False),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.01)
# Finals: the two PCE variants the screen ranked first (pce_all 0.9107, pce_last 0.9100 against the dense twin's
# 0.9085) and the strongest CondConv (every stage, 0.9165: the screen's only clear lead, at pce_all's places).
# condconv_last (0.9104, a tie with pce_last) is left out of the finals for the CPU budget (~30 min a run).
final = dict(seeds=[0, 1, 2, 3, 4], epoch_scale=1.0, variants=["dense", "pce_last", "pce_all", "condconv_all"])
