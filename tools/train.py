#!/usr/bin/env python
"""Train a model from a config.

    python tools/train.py configs/demo_cls_digits.py
    python tools/train.py configs/fmnist_cls_pce.py --work-dir work_dirs/run1 --cfg-options optimizer.lr=0.02
    python tools/train.py configs/fmnist_cls_pce.py --resume                 # continue from work_dir/latest.pth
    torchrun --standalone --nproc_per_node=2 tools/train.py configs/fmnist_cls_pce.py  # DDP (gloo CPU, nccl CUDA)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 --rdzv_id=JOB tools/train.py

The last line, followed by CONFIG and its options, is run on every node of a multi-node run. The recipe, batch size
and lr scaling (optimizer.auto_scale_lr), gradient accumulation (optimizer.accumulate_steps), SyncBatchNorm
(runtime.sync_bn), AMP and resuming: docs/DISTRIBUTED.md.

Prints ``final test top1: 0.9xxx (N images)`` (the configured eval.metric) at the end. A work dir is used by one
run at a time (a lock), and one that holds checkpoints is refused unless ``--resume`` or ``--force``. The merged
config goes into the work dir as ``config.json`` (plain data: what ``--resume`` compares the model config with and
``tools/report.py`` reads; a work dir's ``config.py`` is never executed) and ``config.py``. ``--resume`` without a
``latest.pth`` (a run stopped during its first save) resumes from ``best.pth`` when that is a full training state.
Errors are one line ``error: <file or key>: <what is wrong> (<what was expected>)`` and exit status 1; ``--debug``
shows the traceback.
"""
from __future__ import annotations

import argparse
import math
import sys

from pce.engine import Trainer, cleanup_distributed, init_distributed, is_main_process, load_config
from pce.engine.errors import add_debug_flag, run_cli
from pce.tasks import get_task
from pce.tasks.hooks import default_hooks


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="config file (.py or .yaml)")
    ap.add_argument("--work-dir", help="where checkpoints, logs and the merged config go (runtime.work_dir)")
    ap.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                    help="resume from CHECKPOINT, or from WORK_DIR/latest.pth when no path is given (WORK_DIR/best.pth "
                    "when latest.pth is missing and best.pth holds a full training state)")
    ap.add_argument("--force", action="store_true",
                    help="start a fresh run in a work dir that holds checkpoints (they are replaced)")
    ap.add_argument("--seed", type=int, help="runtime.seed")
    ap.add_argument("--deterministic", action="store_true", help="runtime.deterministic=True")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. optimizer.lr=0.01 phases.0.epochs=2 (values are Python literals)")
    add_debug_flag(ap)
    return ap.parse_args(argv)


def build_overrides(args: argparse.Namespace) -> list:
    overrides = list(args.cfg_options)
    if args.work_dir:
        overrides.append(("runtime.work_dir", args.work_dir))
    if args.seed is not None:
        overrides.append(("runtime.seed", args.seed))
    if args.deterministic:
        overrides.append(("runtime.deterministic", True))
    return overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, build_overrides(args))
        init_distributed(device=cfg.runtime.device)
        task = get_task(cfg.task)
        trainer = Trainer(cfg, task, resume=args.resume, force=args.force, hooks=default_hooks(cfg, task))
        result = trainer.train()
        main_process = is_main_process()  # before the process group goes away
    finally:
        cleanup_distributed()
    final = result.get("final") or {}
    if main_process:
        metric = cfg.eval.metric
        value = final.get(metric)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            n = final.get("num_samples", final.get("num_images"))  # classification / detection
            split = "test" if final.get("split", "test") == "test" else final["split"]
            print(f"final {split} {metric}: {value:.4f}" + (f" ({n} images)" if n is not None else ""), flush=True)
        best = result.get("best") or {}
        if best.get("value") is not None:
            print(f"best val {best['metric']}: {best['value']:.4f} (epoch {best['epoch']}); checkpoints in "
                  f"{cfg.runtime.work_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
