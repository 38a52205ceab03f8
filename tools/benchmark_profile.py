"""``--profile`` of ``tools/benchmark.py``: torch.profiler's top operators of the PCE paths.
Module map: see ``benchmark_timing.py``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from benchmark_breakdown import run_conv_breakdown, run_layer_breakdown
from benchmark_layer import build_layers, layer_fns
from benchmark_model import NUM_CLASSES, build_model, make_train_step, model_names


def run_profile(layer_cfg: Dict[str, Any], preset: str, model_cfg: Dict[str, Any], threads: int, log,
                conv_shape: Optional[Sequence[int]] = None) -> None:
    """torch.profiler top operators (self CPU time) of the PCE top-1 training step, layer and model level; then
    the time per part (:mod:`benchmark_breakdown`) of a ``PCEConv2d`` forward on ``conv_shape`` and of the PCE
    classifier's and its dense twin's inference."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    E = max(layer_cfg["experts"])
    pce, dense = build_layers(layer_cfg, E, "top1")
    x = torch.randn(layer_cfg["batch"], layer_cfg["channels"], layer_cfg["size"], layer_cfg["size"])
    size, batch = model_cfg["inputs"][0], model_cfg["batches"][0]
    xm, ym = torch.randn(batch, 3, size, size), torch.randint(0, NUM_CLASSES, (batch,))
    jobs = [(f"layer E={E} top1 train (PCE)", layer_fns(pce, dense, x, "train")["pce"]),
            (f"layer E={E} top1 train (dense)", layer_fns(pce, dense, x, "train")["dense"])]
    for n in model_names(preset)[:2]:
        jobs.append((f"{n} train {size}x{size} b={batch}", make_train_step(build_model(n).train(), xm, ym)))
    for title, fn in jobs:
        fn(), fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
        log(f"\n-- profile: {title} (3 steps) --")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    if conv_shape is not None:
        run_conv_breakdown(conv_shape, threads, log)
    run_layer_breakdown(model_names(preset)[:2], model_cfg["inputs"][-1], model_cfg["batches"][0], threads, log)
