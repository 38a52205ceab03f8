#!/usr/bin/env python
"""Parameters and FLOPs per module of the model a config builds (fvcore via :mod:`pce.models.flops`;
1 FLOP = 1 fused multiply-add).

    python tools/analyze_model.py configs/fmnist_cls_pce.py [--input-shape 1 28 28] [--max-depth 4]

The input shape defaults to model.input_shape. The model is traced in eval mode on a random input, so with
top-k routing the count covers the experts that input activates (active FLOPs). Operators fvcore does not
count are handled by pce.models.flops (scaled_dot_product_attention, grid_sampler, index_add, upsampling, ...);
free ones (indexing, elementwise) are skipped silently, anything else is listed once at the end.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from pce.engine import load_config
from pce.engine.errors import add_debug_flag, run_cli
from pce.models.flops import active_params_per_token, count_flops
from pce.tasks import get_task


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)  # fvcore's import
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"), help="default: model.input_shape")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-depth", type=int, default=4, help="module depth of the table")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.cfg_options)
    if args.input_shape:
        overrides.append(("model.input_shape", list(args.input_shape)))
    cfg = load_config(args.config, overrides)
    task = get_task(cfg.task)
    model = task.build_model(cfg).eval()
    torch.manual_seed(0)
    inputs = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in task.dummy_inputs(cfg, args.batch_size))
    res = count_flops(model, inputs, max_depth=args.max_depth)
    print(f"model {cfg.model.backbone} ({cfg.task}), input {[tuple(x.shape) for x in inputs]}")
    print(res["table"])
    print(f"total: {res['params'] / 1e6:.3f} M parameters ({active_params_per_token(model) / 1e6:.3f} M active per "
          f"patch), {res['total'] / 1e6:.2f} M FLOPs per batch of {args.batch_size}")
    if res["unsupported"]:
        print("operators not counted: " + ", ".join(f"{k} x{v}" for k, v in sorted(res["unsupported"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
