# Issue #26 study plan, Camelyon demo: read by tools/run_study.py (the format: configs/study/plan_seg.py).
#   python tools/run_study.py configs/study/plan_camelyon.py --stage screen --dry-run
study = "study26_camelyon"
metric = "mIoU"
mode = "max"
reference = "dense"
baselines = ["dense", "condconv_head"]
experts_num = 218           # every validation tile (the first 64 are all background: mIoU 1.0 whatever the model)
variants = dict(
    dense=dict(config="configs/demo_camelyon_seg_dense.py"),
    pce_head=dict(config="configs/demo_camelyon_seg_patchmoe.py"),
    condconv_head=dict(config="configs/study/cam_condconv_head.py"),
    pce_deep=dict(config="configs/demo_camelyon_seg_pce.py", stop=False),  # phased: as in plan_seg.py
    head_top1=dict(config="configs/study/cam_head_top1.py"),
    head_e8=dict(config="configs/study/cam_head_e8.py"),
    head_soft=dict(config="configs/study/cam_head_soft.py"),
    # sixth session: the segmentation plan's other placements and routings on Camelyon (stop=False: phased recipes
    # whose first phase covers half the screening schedule, as in plan_seg.py)
    pce_all=dict(config="configs/study/cam_pce_all.py", stop=False),
    condconv_deep=dict(config="configs/study/cam_condconv_deep.py"),
    condconv_all=dict(config="configs/study/cam_condconv_all.py"),
    head_grid2=dict(config="configs/study/cam_head_grid2.py"),
    head_grid4=dict(config="configs/study/cam_head_grid4.py"),
    head_cosine=dict(config="configs/study/cam_head_cosine.py"),
    head_gate=dict(config="configs/study/cam_head_gate.py"),
    head_expertchoice=dict(config="configs/study/cam_head_expertchoice.py"),
    head_allexperts=dict(config="configs/study/cam_head_allexperts.py", stop=False),
    head_scratch=dict(config="configs/study/cam_head_scratch.py"),
    head_losses=dict(config="configs/study/cam_head_losses.py"),
    deep_allexperts=dict(config="configs/study/cam_deep_allexperts.py", stop=False),
    deep_attention=dict(config="configs/study/cam_deep_attention.py", stop=False),
    deep_losses=dict(config="configs/study/cam_deep_losses.py", stop=False),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.02)
# Finals: the fourth session's four, then (sixth session) the extended screen's best two: head_scratch (experts far
# apart from the start, +0.012 mIoU in the screen) and CondConv in the deep stages (+0.006).
final = dict(seeds=[0, 1, 2, 3, 4], epoch_scale=1.0, variants=["dense", "condconv_head", "pce_head", "pce_deep",
                                                               "head_scratch", "condconv_deep"])
