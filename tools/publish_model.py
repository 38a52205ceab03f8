#!/usr/bin/env python
"""Strip a checkpoint for sharing: weights and the metadata every loader needs, nothing to resume from.

    python tools/publish_model.py work_dirs/demo_det_pce/latest.pth release/demo_det_pce.pth
    # -> release/demo_det_pce-<first 8 hex digits of its sha256>.pth

Reads any checkpoint of PCE (``latest.pth``, ``epoch_N.pth``, ``best.pth``, the output of
``tools/prune_experts.py``, or a bare state dict) and writes its weights only
(:func:`pce.engine.weights.lean_checkpoint`): the EMA weights when it has them (``--no-ema``: the raw model weights), the expert structure of a pruned /
duplicated model (``expert_structure``), the routing phase it was saved in (``phase``), ``epoch``, ``best`` and the
merged ``config``; optimizer, lr scheduler, AMP scaler, RNG states and the EMA copy are dropped. Floating-point
tensors are stored as float32 (``--half``: float16, half the size; loaders cast them back). The file is named like
MMDetection's ``tools/model_converters/publish_model.py`` does, ``OUT-<sha256[:8]>.pth``, written atomically
(temp file, fsync, hard link) and never replaces an existing file. It loads wherever a checkpoint loads:
``tools/eval.py`` / ``infer.py`` / ``export.py`` ``--checkpoint``, ``pce.tasks.Predictor``, ``model.pretrained``.
Non-finite weights are refused.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

from pce.engine.checkpoint import atomic_save, check_finite, load_checkpoint
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.engine.evaluation import check_checkpoint_file
from pce.engine.weights import TRAINING_ONLY_KEYS, lean_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", metavar="IN", help="a checkpoint (.pth) of tools/train.py or tools/prune_experts.py")
    ap.add_argument("out", metavar="OUT", help="output name; written as OUT-<sha256[:8]>.pth")
    ap.add_argument("--no-ema", action="store_true", help="keep the raw model weights, not the EMA weights")
    ap.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    add_debug_flag(ap)
    return ap.parse_args(argv)


def save_hashed(obj: dict, out: Path) -> Path:
    """``torch.save(obj)`` as ``OUT-<sha256[:8]>.pth`` beside ``out``: an atomically written temp file, hashed, then
    hard-linked onto its name (atomic, and refused by the OS when that file exists). Returns the path."""
    stem = out.name.removesuffix(".pth")
    tmp = out.with_name(f".{stem}.{os.getpid()}.publish.tmp")
    try:
        atomic_save(obj, tmp)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        final = out.with_name(f"{stem}-{digest.hexdigest()[:8]}.pth")
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise PCEError(final, "already exists (not replaced)", "another OUT, or remove the file first") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def publish(args: argparse.Namespace) -> int:
    src, out = Path(args.checkpoint), Path(args.out)
    check_checkpoint_file(src)
    if out.is_dir():
        raise PCEError(out, "is a folder", "OUT: a file name, written as OUT-<sha256[:8]>.pth")
    ckpt = load_checkpoint(src)
    lean = lean_checkpoint(ckpt, prefer_ema=not args.no_ema, dtype=torch.float16 if args.half else torch.float32)
    check_finite(lean["model"], src, " in the saved weights")
    if args.no_ema and ckpt.get("weights") == "ema":
        print(f"note: {src} holds the EMA weights only (a weights-only best.pth): --no-ema keeps those")
    dropped = [k for k in TRAINING_ONLY_KEYS if ckpt.get(k) is not None and ("model" in ckpt or "state_dict" in ckpt)]
    final = save_hashed(lean, out)
    size = final.stat().st_size / 2 ** 20
    kept = ", ".join(k for k in lean if k != "model")
    print(f"{final}: {len(lean['model'])} tensors ({lean['weights']} weights, "
          f"{'float16' if args.half else 'float32'}), {size:.2f} MB (was {src.stat().st_size / 2 ** 20:.2f} MB); "
          f"kept {kept}; dropped {', '.join(dropped) or 'nothing'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: publish(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
