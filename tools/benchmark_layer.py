"""The layer level of ``tools/benchmark.py``: ``PCELayer`` (E experts; top-1, top-2 or soft cosine routing)
against ``DenseLayer`` (same expert, width and input), forward (eval, no_grad) and forward + backward (train).
Module map: see ``benchmark_timing.py``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
from torch import nn

from benchmark_timing import bench_interleaved, median

ROUTINGS = {"top1": dict(top_k=1), "top2": dict(top_k=2), "soft": dict(router_kwargs={"threshold": False})}


def build_layers(cfg: Dict[str, Any], E: int, routing: str):
    from pce.models.layer import DenseLayer, PCELayer

    torch.manual_seed(0)
    pce = PCELayer(cfg["channels"], cfg["patch"], num_experts=E, router="cosine", **ROUTINGS[routing])
    dense = DenseLayer(cfg["channels"])
    return pce, dense


def layer_fns(pce: nn.Module, dense: nn.Module, x: torch.Tensor, mode: str) -> Dict[str, Callable[[], Any]]:
    if mode == "fwd":
        pce.eval(), dense.eval()

        def fwd(m):
            def run():
                with torch.no_grad():
                    return m(x)
            return run
        return {"pce": fwd(pce), "dense": fwd(dense)}
    pce.train(), dense.train()
    grad = torch.randn_like(x)

    def train(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).backward(grad)
        return run
    return {"pce": train(pce), "dense": train(dense)}


def run_layer_level(cfg: Dict[str, Any], threads: int, log) -> List[Dict[str, Any]]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    rows = []
    for E in cfg["experts"]:
        for routing in cfg["routings"]:
            pce, dense = build_layers(cfg, E, routing)
            for mode in ("fwd", "train"):
                t = bench_interleaved(layer_fns(pce, dense, x, mode), cfg["warmup"], cfg["reps"], cfg["min_reps"],
                                      cfg["budget_s"])
                p, d = median(t["pce"]["wall"]), median(t["dense"]["wall"])
                pc, dc = median(t["pce"]["cpu"]), median(t["dense"]["cpu"])
                row = {"experts": E, "routing": routing, "mode": mode, "pce_ms": p, "dense_ms": d, "ratio": p / d,
                       "pce_cpu_ms": pc, "dense_cpu_ms": dc, "ratio_cpu": pc / dc, "reps": len(t["pce"]["wall"]),
                       "execution": pce.strategy.resolve(pce.router, x.device).name}
                rows.append(row)
                log(f"  layer E={E:<2} {routing:<4} {mode:<5} pce {p:8.2f} ms  dense {d:8.2f} ms  "
                    f"ratio {p / d:6.2f} (CPU time {pc / dc:5.2f})  {row['reps']} reps, {row['execution']}")
    return rows
