"""Capture an export target, write it as ONNX or torch.export (.pt2) and check the written file against the eager
model (``tools/export.py``; the target comes from the task's ``export_target``, :mod:`pce.tasks.export_targets`).

:func:`export_and_check`: fold batch norms into a copy of the module (``fuse``), capture it with ``torch.export``
(ONNX: converted from that program with the dynamo exporter, then ``onnx.checker`` and onnxruntime on the CPU),
run the written file on held-back inputs and compare every output with the unfused eager module. Above ``atol``
(times ``max(1, max |eager|)``) it raises and nothing is written: the file is written under a temporary name and
moved into place only once checked.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

from pce.engine.errors import PCEError
from pce.models.fuse import fuse_for_inference
from pce.moe.experts import StackedBatchNorm2d
from pce.moe.recorder import record_routing

__all__ = ["SUFFIX", "held_back_inputs", "export_and_check", "output_names", "capture", "write_file", "compare",
           "routing_changes", "versions"]

SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
Runner = Callable[[Any], List[torch.Tensor]]


def held_back_inputs(make_input: Callable[[int, int], Any], batch: int, dynamic_batch: bool) -> Tuple[Any, List[Any]]:
    """``(capture example (seed 0), check inputs)``: two more batches of ``batch``, plus batch sizes 1 and
    ``batch + 3`` with a dynamic batch."""
    checks = [make_input(batch, 1), make_input(batch, 2)]
    if dynamic_batch:
        checks += [make_input(1, 3), make_input(batch + 3, 4)]
    return make_input(batch, 0), checks


def export_and_check(module: nn.Module, example: Any, checks: Sequence[Any], fmt: str, out: Path, what: str,
                     label: str, fuse: bool = True, dynamic_batch: bool = False, atol: float = 1e-4
                     ) -> Dict[str, Any]:
    """Export ``module`` (eval mode; ``what``: ``"model"`` or ``"backbone"``, ``label``: what it is, in words) as
    ``fmt`` to ``out`` and check the file on ``checks``, printing what it does. Returns ``{"output_names",
    "input_shape", "max_abs_diff", "max_abs_eager"}``; ``PCEError`` above ``atol`` (nothing written)."""
    target = copy.deepcopy(module)  # what is exported; ``module`` stays the eager reference
    target = fuse_for_inference(target) if fuse else target.eval()
    with torch.no_grad():
        names = output_names(module(example), what)
    shape = list(tree_flatten(example)[0][0].shape)
    print(f"exporting {label}: input {shape}"
          f"{' (dynamic batch)' if dynamic_batch else ''} -> {', '.join(names)}; "
          f"{_num_norms(module) - _num_norms(target)} batch norms folded")
    ep = capture(target, example, dynamic_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")  # moved into place once checked
    try:
        diff, scale = _check(module, write_file(ep, fmt, tmp, names), checks, names, fmt)
        bad = [n for n in names if diff[n] > atol * max(1.0, scale[n])]
        if bad:
            raise PCEError(out, f"output {bad[0]}: max |{fmt} - eager| = {diff[bad[0]]:.3g} is above --atol "
                           f"{atol:g} x max(1, {scale[bad[0]]:.3g}); nothing written",
                           "outputs equal to the eager model's; try --no-fuse, or report it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"output_names": names, "input_shape": shape, "max_abs_diff": diff, "max_abs_eager": scale}


def _check(module: nn.Module, runner: Runner, checks: Sequence[Any], names: List[str], fmt: str
           ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """:func:`compare` on ``checks``, printing the batch sizes, the routing changes and the diff per output."""
    diff, scale = compare(module, runner, checks, names)
    changed, layers = routing_changes(module, checks)
    print(f"checked on {len(checks)} held-back inputs (batch sizes "
          f"{', '.join(str(tree_flatten(x)[0][0].shape[0]) for x in checks)}); "
          + (f"top-1 routing differs between two of them in {changed} of {layers} PCE layers" if layers
             else "no PCE layers (a dense model)"))
    for n in names:
        print(f"  {n}: max |{fmt} - eager| = {diff[n]:.3g} (max |eager| = {scale[n]:.3g})")
    return diff, scale


def output_names(out: Any, what: str) -> List[str]:
    """One name per flattened output tensor: ``logits`` / ``features`` for a lone tensor, else the keys."""
    leaves = tree_flatten_with_path(out)[0]
    if len(leaves) == 1 and isinstance(out, torch.Tensor):
        return ["logits" if what == "model" else "features"]
    return [re.sub(r"\W+", "_", keystr(path)).strip("_") or f"output{i}" for i, (path, _) in enumerate(leaves)]


def capture(module: nn.Module, example: Any, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``example`` (a batch ``[B, C, H, W]``); batch dim dynamic if asked."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():  # the positional encodings' caches, restored after export
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        return torch.export.export(module, (example,), dynamic_shapes=shapes)


def write_file(ep: torch.export.ExportedProgram, fmt: str, path: Path, names: List[str]) -> Runner:
    """Write ``ep`` as ``fmt`` to ``path``; returns a runner of the written file (inputs -> flat outputs)."""
    if fmt == "torch_export":
        torch.export.save(ep, str(path))
        loaded = torch.export.load(str(path)).module()

        def run_pt2(x: Any) -> List[torch.Tensor]:
            with torch.no_grad():
                return tree_flatten(loaded(x))[0]
        return run_pt2
    import onnx
    import onnxruntime as ort
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # one "skipping constant folding" line per Split
    torch.onnx.export(ep, f=str(path), input_names=["images"], output_names=names, dynamo=True,
                      external_data=False, verbose=False)
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in sess.get_inputs()]

    def run_onnx(x: Any) -> List[torch.Tensor]:
        arrays = [t.numpy() for t in tree_flatten(x)[0]]
        return [torch.from_numpy(a) for a in sess.run(None, dict(zip(feeds, arrays)))]
    return run_onnx


def compare(reference: nn.Module, runner: Runner, inputs: Sequence[Any], names: List[str]
            ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``(max |exported - eager|, max |eager|)`` per output over ``inputs`` (eager: the unfused model)."""
    diff = {n: 0.0 for n in names}
    scale = {n: 0.0 for n in names}
    for x in inputs:
        with torch.no_grad():
            want = tree_flatten(reference(x))[0]
        got = runner(x)
        if len(got) != len(want):
            raise PCEError("export", f"the file returns {len(got)} outputs, the eager model {len(want)}")
        for n, g, w in zip(names, got, want):
            if tuple(g.shape) != tuple(w.shape):
                raise PCEError("export", f"output {n}: shape {tuple(g.shape)}, eager {tuple(w.shape)}",
                               "the same shape on every input")
            diff[n] = max(diff[n], (g.float() - w.float()).abs().max().item() if w.numel() else 0.0)
            scale[n] = max(scale[n], w.float().abs().max().item() if w.numel() else 0.0)
    return diff, scale


def routing_changes(reference: nn.Module, inputs: Sequence[Any]) -> Tuple[int, int]:
    """``(layers whose top-1 experts differ between the first two inputs, PCE layers)``: proof that the checked
    inputs exercise input-dependent routing."""
    with torch.no_grad(), record_routing(reference) as rec:
        for x in inputs[:2]:
            reference(x)
    res = rec.results
    n = len(res) // 2
    return sum(not torch.equal(res[i].weights.argmax(-1), res[i + n].weights.argmax(-1)) for i in range(n)), n


def _num_norms(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, StackedBatchNorm2d)) for m in module.modules())


def versions(fmt: str) -> Dict[str, str]:
    """The library versions a file of ``fmt`` was written with (for the sidecar)."""
    v = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime
        v.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return v
