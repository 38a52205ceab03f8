#!/usr/bin/env python
"""Print the merged, validated config (with _base_ files and --cfg-options applied).

    python tools/print_config.py configs/fmnist_cls_pce.py --cfg-options optimizer.lr=0.01 [--format yaml]

Errors are one line naming the file or key (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import sys

import yaml

from pce.engine import config_to_dict, format_config, load_config
from pce.engine.errors import add_debug_flag, run_cli


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--format", choices=["py", "yaml"], default="py")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.cfg_options)
    if args.format == "py":
        print(format_config(cfg))
    else:
        from pce.engine.config import to_plain

        print(yaml.safe_dump(to_plain(config_to_dict(cfg)), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
