# Issue #26 study plan, Camelyon demo: read by tools/run_study.py (the format: configs/study/plan_seg.py).
#   python tools/run_study.py configs/study/plan_camelyon.py --stage screen --dry-run
study = "study26_camelyon"
metric = "mIoU"
mode = "max"
reference = "dense"
baselines = ["dense", "condconv_head"]
variants = dict(
    dense=dict(config="configs/demo_camelyon_seg_dense.py"),
    pce_head=dict(config="configs/demo_camelyon_seg_patchmoe.py"),
    condconv_head=dict(config="configs/study/cam_condconv_head.py"),
    pce_deep=dict(config="configs/demo_camelyon_seg_pce.py"),
    head_top1=dict(config="configs/study/cam_head_top1.py"),
    head_e8=dict(config="configs/study/cam_head_e8.py"),
    head_soft=dict(config="configs/study/cam_head_soft.py"),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.02)
final = dict(seeds=[0, 1, 2, 3, 4], epoch_scale=1.0, variants=["dense", "condconv_head", "pce_head", "pce_deep"])
