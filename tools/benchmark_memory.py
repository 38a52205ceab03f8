"""Peak resident memory of one training step for ``tools/benchmark.py``, each model in a fresh subprocess
(``benchmark.py --_memory-worker NAME ...`` runs :func:`memory_worker`). Module map: see ``benchmark_timing.py``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from benchmark_model import NUM_CLASSES, build_model, make_train_step, model_names

#: the entry point whose hidden ``--_memory-worker`` flags run :func:`memory_worker` in a subprocess
ENTRY_POINT = Path(__file__).resolve().with_name("benchmark.py")


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; elsewhere the peak so far, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return _maxrss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process: VmHWM on Linux (per address space, so neither the parent's
    peak inherited through fork/exec nor anything before :func:`_reset_peak` counts), else getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); getrusage and VmHWM then report peaks from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(name: str, size: int, batch: int, threads: int, steps: int) -> Dict[str, Any]:
    """In a fresh process: build the model, run one warm-up training step, then measure ``steps`` more.

    ``peak_rss_mb``: peak RSS during the measured steps minus the RSS after construction and warm-up
    (activations, gradients and temporaries of one step; parameters and optimizer state are in the baseline).
    ``total_training_mb``: the same peak minus the RSS before the model was built (after the imports), i.e.
    everything the model's training costs, parameters, momentum and gradients included."""
    torch.set_num_threads(threads)
    if name == "resnet18":
        import torchvision  # noqa: F401
    elif name.startswith("efficientnet"):
        import timm  # noqa: F401
    else:
        import pce.models.classifier  # noqa: F401
    _trim()
    before = _rss_mb()
    model = build_model(name).train()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    step = make_train_step(model, x, y)
    step()
    _trim()
    base = _rss_mb()
    reset = _reset_peak()
    for _ in range(steps):
        step()
    peak = _peak_rss_mb()
    return {"peak_rss_mb": peak - base, "abs_peak_rss_mb": peak, "baseline_rss_mb": base,
            "total_training_mb": peak - before, "rss_before_model_mb": before,
            "peak_reset": reset, "input": size, "batch": batch, "threads": threads, "steps": steps}


def start_memory(preset: str, cfg: Dict[str, Any], threads: int) -> Dict[str, subprocess.Popen]:
    """Start one fresh subprocess per model of ``preset`` (side by side: resident memory is per process; they
    start after the timed sections, so they disturb no timing)."""
    return start_memory_for(model_names(preset), cfg, threads)


def start_memory_for(names: Sequence[str], cfg: Dict[str, Any], threads: int) -> Dict[str, subprocess.Popen]:
    """:func:`start_memory` for any :func:`benchmark_model.build_model` names."""
    env = dict(os.environ)
    # A fixed mmap threshold turns off glibc's dynamic threshold, so freed activations go back to the OS and
    # the RSS after the warm-up step is a clean baseline.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    procs = {}
    for n in names:
        cmd = [sys.executable, str(ENTRY_POINT), "--_memory-worker", n, "--_mem-input", str(cfg["input"]),
               "--_mem-batch", str(cfg["batch"]), "--_mem-threads", str(threads), "--_mem-steps", str(cfg["steps"])]
        procs[n] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return procs


def collect_workers(procs: Dict[str, subprocess.Popen]) -> Dict[str, Any]:
    """Each worker's measurement, by model name."""
    out: Dict[str, Any] = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory worker for {n} failed:\n{stderr[-2000:]}")
        out[n] = json.loads(stdout.strip().splitlines()[-1])
    return out


def collect_memory(preset: str, procs: Dict[str, subprocess.Popen]) -> Dict[str, Any]:
    out = collect_workers(procs)
    pce_name, dense_name, _ = model_names(preset)
    out["ratio_pce_vs_dense"] = out[pce_name]["peak_rss_mb"] / max(out[dense_name]["peak_rss_mb"], 1e-6)
    out["ratio_total_pce_vs_dense"] = (out[pce_name]["total_training_mb"]
                                       / max(out[dense_name]["total_training_mb"], 1e-6))
    return out
