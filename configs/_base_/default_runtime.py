# Runtime defaults shared by every config (see pce/engine/defaults.py for all keys).
runtime = dict(
    work_dir="",                # "": work_dirs/<config name>
    seed=0,
    deterministic=False,
    device="auto",              # auto | cpu | cuda
    amp="none",                 # none | bf16 | fp16 (CUDA only)
    channels_last=False,
    ema=0.0,                    # weights EMA decay, 0 = off
    log_interval=20,
    eval_interval=1,
    checkpoint_interval=1,
    kmeans_init_batches=8,
    tensorboard=True,
    progress_bar=True,
)
eval = dict(metric="top1", mode="max", topk=(1, 5))
