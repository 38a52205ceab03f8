# Issue #26 study plan, detection demo (Faster R-CNN + FPN, AP50): read by tools/run_study.py (format:
# configs/study/plan_seg.py).
#   python tools/run_study.py configs/study/plan_det.py --stage screen --dry-run
study = "study26_det"
metric = "AP50"
mode = "max"
reference = "dense"
baselines = ["dense", "condconv_fpn"]
experts_num = 100           # the experts analysis on all 100 validation images (the default 64 left a third out)
variants = dict(
    dense=dict(config="configs/demo_det_dense.py"),
    pce_deep=dict(config="configs/demo_det_pce.py"),                   # today's recipe: experts in the backbone
    pce_fpn=dict(config="configs/study/det_fpn_pce.py", stop=False),   # PatchConvMoE's place: FPN output convs
    condconv_fpn=dict(config="configs/study/det_fpn_condconv.py"),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.05)
# Finals: the baselines and the one PCE variant the screen kept (sixth session: pce_fpn 0.9202 AP50 against the dense
# twin's 0.9178; pce_deep was stopped at half, 0.7232 against 0.8430 at epoch 6, clearly behind).
final = dict(seeds=[0, 1, 2, 3, 4], epoch_scale=1.0, variants=["dense", "condconv_fpn", "pce_fpn"])
