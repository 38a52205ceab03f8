"""The model level of ``tools/benchmark.py``: the PCE classifier preset (top-1) against its dense twin and
``torchvision.models.resnet18`` (inference latency and training-step time), their FLOPs and parameters, and the
model builders and step functions the memory, profile and compile sections reuse.
Module map: see ``benchmark_timing.py``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmark_timing import bench_interleaved, median

NUM_CLASSES = 10
#: ``pce_tiny:floor``: the preset with router override ``"shared"`` (every patch to expert 0: no router, no gather,
#: one expert call on all patches); its grid, patch cuts and reassembly are the preset's own
FLOOR = "floor"


def build_model(name: str) -> nn.Module:
    """A PCE classifier preset (``pce_tiny``, ``dense_tiny``, ...; ``pce_tiny:floor``, see :data:`FLOOR`),
    ``resnet18`` (torchvision) or a timm model named ``efficientnet*`` (``efficientnet_b0``,
    ``efficientnet_cc_b0_4e``; ``pretrained=False``)."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=NUM_CLASSES)
    if name.startswith("efficientnet"):
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    from pce.models.classifier import build_classifier

    base, _, variant = name.partition(":")
    model = build_classifier(base, NUM_CLASSES)
    if variant == FLOOR:  # every patch to expert 0, no router: the floor of any exact dispatch of this grid
        from pce.models.routed import set_router_override

        set_router_override(model, "shared")
    elif variant:
        raise ValueError(f"unknown model variant {name!r} (expected PRESET or PRESET:{FLOOR})")
    return model


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """One training step: zero grads, forward, loss (plus router losses for PCE classifiers), backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    has_losses = hasattr(model, "losses")

    def step():
        opt.zero_grad(set_to_none=True)
        if has_losses:
            losses, _ = model.losses(x, y)
            loss = sum(losses.values())
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def make_infer(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def infer():
        with torch.no_grad():
            return model(x)
    return infer


def model_names(preset: str) -> Tuple[str, str, str]:
    return f"pce_{preset}", f"dense_{preset}", "resnet18"


def time_models(models: Dict[str, Any], x: torch.Tensor, y: torch.Tensor, mode: str, cfg: Dict[str, Any]
                ) -> Dict[str, Any]:
    """Interleaved timings (:func:`bench_interleaved`) of every model's inference or training step on ``x``."""
    fns = {}
    for n, m in models.items():
        m.train(mode == "train")
        fns[n] = make_train_step(m, x, y) if mode == "train" else make_infer(m, x)
    return bench_interleaved(fns, cfg["warmup"], cfg["reps"], cfg["min_reps"], cfg["budget_s"])


def run_model_level(cfg: Dict[str, Any], preset: str, threads: Sequence[int], log) -> List[Dict[str, Any]]:
    names = model_names(preset)
    models = {n: build_model(n) for n in names}
    rows = []
    for size in cfg["inputs"]:
        for batch in cfg["batches"]:
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size)
            y = torch.randint(0, NUM_CLASSES, (batch,))
            for th in threads:
                torch.set_num_threads(th)
                for mode in ("infer", "train"):
                    t = time_models(models, x, y, mode, cfg)
                    ms = {n: median(v["wall"]) for n, v in t.items()}
                    cpu = {n: median(v["cpu"]) for n, v in t.items()}
                    for n in names:
                        rows.append({"name": n, "input": size, "batch": batch, "threads": th, "mode": mode,
                                     "ms": ms[n], "images_per_s": batch / ms[n] * 1e3,
                                     "ratio_vs_dense": ms[n] / ms[names[1]],
                                     "ratio_vs_resnet18": ms[n] / ms[names[2]], "cpu_ms": cpu[n],
                                     "ratio_cpu_vs_dense": cpu[n] / cpu[names[1]], "reps": len(t[n]["wall"])})
                    log(f"  model {size}x{size} b={batch:<3} threads={th} {mode:<5} " + "  ".join(
                        f"{n} {ms[n]:8.1f} ms" for n in names) + f"  ({len(t[names[0]]['wall'])} reps)")
    return rows


# -- FLOPs and parameters -----------------------------------------------------------------------------------
def run_flops(preset: str, size: int) -> Dict[str, Dict[str, Any]]:
    from pce.models.flops import active_params_per_token, count_flops

    out = {}
    for n in model_names(preset):
        m = build_model(n).eval()
        r = count_flops(m, torch.randn(1, 3, size, size))
        out[n] = {"gflops": r["gflops"], "params": r["params"], "active_params_per_token": active_params_per_token(m),
                  "input": size, "by_operator": r["by_operator"], "unsupported_ops": r["unsupported"]}
    return out
