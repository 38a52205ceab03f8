"""The README's main job on built-in data: train PCE Faster R-CNN on the procedural VOC-format demo set,
evaluate it, and draw a few predictions. Runs on a CPU in a few minutes; nothing is downloaded.

    python tools/demo.py [--epochs 6] [--work-dir work_dirs/demo]

It is a thin script over the three commands a user would type (printed as they run):
tools/train.py, tools/eval.py and tools/infer.py with configs/demo_det_pce.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pce.engine.errors import add_debug_flag, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_det_pce.py"


class StepFailed(RuntimeError):
    """A step of the demo exited non-zero (it printed its own one-line error)."""


def run(cmd: list) -> None:
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run([sys.executable] + cmd, cwd=ROOT).returncode
    if rc:
        raise StepFailed(f"{cmd[0]}: exited with status {rc} (its error is printed above)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="training epochs (the full config trains 24)")
    ap.add_argument("--work-dir", default="work_dirs/demo")
    ap.add_argument("--iters-per-epoch", type=int, default=0, help="cap iterations per epoch (0: full epochs)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _demo(ap, args), debug=args.debug)


def _demo(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.epochs < 3:
        ap.error("--epochs must be >= 3 (one stabilisation, one routing and one fine-tuning epoch)")
    work = Path(args.work_dir)
    route = max(1, (args.epochs - 1) // 3)
    short = [f"schedule.epochs={args.epochs}", f"phases.1.epochs={route}", "runtime.progress_bar=False",
             f"schedule.iters_per_epoch={args.iters_per_epoch}"]
    run(["tools/train.py", CONFIG, "--work-dir", str(work), "--cfg-options", *short])
    metrics = work / "metrics_val.json"
    run(["tools/eval.py", CONFIG, "--checkpoint", str(work / "best.pth"), "--split", "val", "--out", str(metrics)])
    images = sorted((ROOT / "data/demo_voc/VOCdevkit/VOC2007/JPEGImages").glob("*.jpg"))[-4:]
    drawn = work / "predictions"
    run(["tools/infer.py", CONFIG, "--checkpoint", str(work / "best.pth"), *map(str, images), "--out", str(drawn),
         "--score-thr", "0.5"])
    m = json.loads(metrics.read_text())
    print(f"\nPCE Faster R-CNN on the demo data after {args.epochs} epochs: "
          f"mAP {m['mAP']:.3f}, AP50 {m['AP50']:.3f} (VOC07 11-point {m['AP50_voc07']:.3f})")
    print(f"drawn predictions: {drawn}/  (the full recipe: python tools/train.py {CONFIG})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
