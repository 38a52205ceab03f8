# Issue #26 study plan, segmentation demo: read by tools/run_study.py (plain data; not a training config).
#   python tools/run_study.py configs/study/plan_seg.py --stage screen --dry-run
# variants: name -> config (+ options: extra --cfg-options; "{root}" is the stage's folder, "{seed}" the seed).
# screen: one seed, every variant, each schedule (schedule.epochs and every phase's epochs) scaled by epoch_scale;
# a variant whose best metric is behind the reference's by more than stop_margin at half its schedule is stopped
# (unless it says stop=False: phased recipes whose first phase covers half the schedule).
# final: the baselines plus the best two variants of the screening (fill in `final["variants"]`), 5 seeds.
# experts_num: validation samples of every run's experts analysis (tools/analyze_experts.py --num; default 64).
study = "study26_seg"
metric = "mIoU"
mode = "max"
reference = "dense"          # the dense twin: the stop rule's and the Welch tables' reference
baselines = ["dense", "condconv_head"]
experts_num = 100           # the experts analysis on all 100 validation images (tools/run_study.py: default 64)
variants = dict(
    dense=dict(config="configs/demo_seg_dense.py"),                       # plain convolutions everywhere
    # placement
    pce_head=dict(config="configs/demo_seg_patchmoe.py"),                 # PatchConvMoE: one PCEConv2d, decoder's last
    condconv_head=dict(config="configs/demo_seg_condconv.py"),            # conv = the head's classifier
    pce_deep=dict(config="configs/demo_seg_pce.py", stop=False),          # PCE layers in stages 3-4 (today's recipe)
    condconv_deep=dict(config="configs/study/seg_condconv_deep.py"),
    pce_all=dict(config="configs/demo_seg_pce_allstages.py", stop=False),
    condconv_all=dict(config="configs/study/seg_condconv_all.py"),
    # routing of the PCEConv2d head
    head_top1=dict(config="configs/study/seg_head_top1.py"),
    head_e8=dict(config="configs/study/seg_head_e8.py"),
    head_grid2=dict(config="configs/study/seg_head_grid2.py"),
    head_grid4=dict(config="configs/study/seg_head_grid4.py"),
    head_cosine=dict(config="configs/study/seg_head_cosine.py"),
    head_gate=dict(config="configs/study/seg_head_gate.py"),
    head_expertchoice=dict(config="configs/study/seg_head_expertchoice.py"),
    head_soft=dict(config="configs/study/seg_head_soft.py"),
    head_allexperts=dict(config="configs/study/seg_head_allexperts.py", stop=False),
    head_noshared=dict(config="configs/study/seg_head_noshared.py"),
    head_scratch=dict(config="configs/study/seg_head_scratch.py"),       # experts far apart from the start
    head_upcycled=dict(config="configs/demo_seg_patchmoe_upcycled.py",   # from this stage's trained dense twin
                       options=["model.pretrained={root}/dense_s{seed}/best.pth"]),
    # routing of the deep-stage PCE layers
    deep_top2=dict(config="configs/study/seg_deep_top2.py"),
    deep_e8=dict(config="configs/study/seg_deep_e8.py"),
    deep_allexperts=dict(config="configs/study/seg_deep_allexperts.py", stop=False),
    # the proposal's options never run on data: deformable attention as the third phase, its own losses
    deep_attention=dict(config="configs/study/seg_deep_attention.py", stop=False),
    deep_losses=dict(config="configs/study/seg_deep_losses.py", stop=False),
    head_losses=dict(config="configs/study/seg_head_losses.py"),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.02)
# The finals that ran (fourth and fifth sessions; the screen's best two, head_cosine and head_expertchoice, and two
# variants routing from the first epoch). They ran as work_dirs/study/<config>_s<S> with the same commands;
# docs/STUDY.md links them into work_dirs/study26_seg/final/ for --summary-only.
final = dict(seeds=[0, 1, 2, 3, 4], epoch_scale=1.0, variants=["dense", "condconv_head", "pce_head", "head_cosine",
                                                               "head_expertchoice", "head_noshared", "head_scratch"])
