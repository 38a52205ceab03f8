"""Timing and machine information of ``tools/benchmark.py``: candidates timed interleaved (wall and process CPU
time), medians, the run's soft deadline, and what machine / load the numbers come from.

The benchmark's modules: ``benchmark.py`` (entry point, CLI, settings), ``benchmark_timing.py`` (this),
``benchmark_layer.py`` (layer-level rows), ``benchmark_model.py`` (model-level rows, FLOPs, model builders),
``benchmark_memory.py`` (peak memory in fresh subprocesses), ``benchmark_profile.py`` (torch.profiler),
``benchmark_report.py`` (targets and the text report), ``benchmark_compile.py`` (the ``--compile`` section).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

#: Wall-clock time (perf_counter) after which every group stops at ``min_reps`` (set by ``--max-minutes``).
DEADLINE = [math.inf]


def bench_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, reps: int, min_reps: int,
                      budget_s: float) -> Dict[str, Dict[str, List[float]]]:
    """Run the candidates interleaved (order reversed every round, so drift hits all of them alike) and
    return per candidate the wall times (``"wall"``) and process CPU times (``"cpu"``) in milliseconds.
    With one thread the CPU time is what the computation cost, whatever else runs on the machine."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, Dict[str, List[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    start = time.perf_counter()
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            times[n]["wall"].append((t1 - t0) * 1e3)
            times[n]["cpu"].append((c1 - c0) * 1e3)
        now = time.perf_counter()
        if r + 1 >= min_reps and (now - start > budget_s or now > DEADLINE[0]):
            break
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "device": "cpu"}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
