#!/usr/bin/env python
"""Print the merged, validated config (with _base_ files and --cfg-options applied).

    python tools/print_config.py configs/fmnist_cls_pce.py --cfg-options optimizer.lr=0.01 [--format yaml]
"""
from __future__ import annotations

import argparse
import sys

import yaml

from pce.engine import ConfigError, config_to_dict, format_config, load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--format", choices=["py", "yaml"], default="py")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.format == "py":
        print(format_config(cfg))
    else:
        from pce.engine.config import to_plain

        print(yaml.safe_dump(to_plain(config_to_dict(cfg)), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
