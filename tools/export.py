#!/usr/bin/env python
"""Export a trained model to ONNX or torch.export (.pt2), then check the file against the eager model.

    python tools/export.py configs/demo_cls_digits.py --checkpoint work_dirs/demo_cls_digits/best.pth \\
        --format onnx --dynamic-batch                     # -> work_dirs/demo_cls_digits/best.onnx (+ .json)
    python tools/export.py configs/demo_seg_pce.py --checkpoint CKPT --format torch_export --what backbone

Steps: build the model of CONFIG, load CKPT (its EMA weights when it has them) in the routing phase it was
saved in, eval(), fold batch norms into the convolutions before them (exact in eval mode; ``--no-fuse`` keeps
them), capture with ``torch.export`` (ONNX: converted from that program with the dynamo exporter), then run the
file (ONNX: ``onnx.checker`` and onnxruntime on the CPU) on held-back random inputs, other than the capture
example (two of them, plus batch sizes 1 and 5 with ``--dynamic-batch``), and compare every output with the
unfused eager model: the max abs difference per output is printed, and above ``--atol`` (times
``max(1, max |eager|)``) the tool fails and writes nothing. Inputs are what the model takes after the config's
eval transform (images in [0, 1] normalised with its mean / std; detection: the detector's own preprocessing).

Written: ``--out`` (default: next to the checkpoint, ``<checkpoint stem>[_backbone].onnx|.pt2``) and
``<out>.json`` (input name / shape, mean / std, output names, max diffs, versions). An existing file is never
overwritten without ``--force``. ``--random-weights`` (instead of ``--checkpoint``, with ``--out``) exports an
untrained model, to check that a config exports before training it.

Routing stays input-dependent in the file: under capture, PCE layers run the static-shape ``capacity``
execution (equal to ``sparse`` when no token overflows). ``execution="context"`` cannot be captured and is
refused with the config key to change. Faster R-CNN as a whole stops in torchvision (data-dependent NMS shapes):
``--what model`` then exports the backbone + FPN (``model.backbone``: preprocessed batch -> FPN maps), and says so.
TorchScript (``torch.jit.script``) is not supported.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

from pce.engine import load_config
from pce.engine.evaluation import load_trained_weights
from pce.engine.errors import PCEError, add_debug_flag, one_line, run_cli
from pce.engine.phases import find_backbones
from pce.models.fuse import capture_blockers, fuse_for_inference
from pce.moe.experts import StackedBatchNorm2d
from pce.moe.recorder import record_routing
from pce.tasks import get_task

SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
EXECUTION_KEY = "model.backbone_overrides.execution"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .pth written by tools/train.py (best.pth, latest.pth)")
    src.add_argument("--random-weights", action="store_true", help="no checkpoint: an untrained model (needs --out)")
    ap.add_argument("--format", required=True, choices=sorted(SUFFIX))
    ap.add_argument("--what", default="model", choices=["model", "backbone"])
    ap.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="default: model.input_shape")
    ap.add_argument("--batch-size", type=int, default=2, help="of the capture example (default 2)")
    ap.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch dimension")
    ap.add_argument("--out", help="the file to write (default: next to the checkpoint)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ap.add_argument("--no-fuse", action="store_true", help="keep the batch norms (no folding)")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest max |exported - eager| per output, times "
                                                               "max(1, max |eager|) (default 1e-4)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)


# -- files -------------------------------------------------------------------------------------------------------
def output_paths(args: argparse.Namespace) -> Tuple[Path, Path]:
    """``(file, sidecar)``; ``PCEError`` when one exists (without ``--force``) or none can be derived."""
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        ckpt = Path(args.checkpoint)
        out = ckpt.with_name(ckpt.stem + ("_backbone" if args.what == "backbone" else "") + SUFFIX[args.format])
    else:
        raise PCEError("--out", "missing", "--random-weights writes no file next to a checkpoint: name one")
    sidecar = out.with_name(out.name + ".json")
    for p in (out, sidecar):
        if p.exists() and not args.force:
            raise PCEError(p, "exists", "pass --force to overwrite it, or another --out")
    return out, sidecar


# -- model ---------------------------------------------------------------------------------------------------------
def load_model(cfg: Any, task: Any, args: argparse.Namespace) -> nn.Module:
    """The config's model with the checkpoint's weights in its routing phase (as tools/eval.py), eval mode;
    ``PCEError`` naming the config key when a layer's execution cannot be captured."""
    if args.checkpoint and not Path(args.checkpoint).is_file():  # fail before building the model
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    model = task.build_model(cfg)
    blockers = capture_blockers(model)
    if blockers:
        execs = sorted({getattr(m, "execution", "?") for n, m in model.named_modules()
                        if n in {b[0] for b in blockers}})
        raise PCEError(EXECUTION_KEY, f"execution={execs[0]!r} ({len(blockers)} layers, e.g. {blockers[0][0]}) "
                       f"has data-dependent shapes and cannot be exported",
                       "an execution that captures: capacity, sparse, auto, dense, fused or map; a model trained "
                       "with 'context' computes differently under them, so train it with one of those")
    if args.checkpoint:
        load_trained_weights(model, cfg, args.checkpoint)  # pruned structure, EMA weights, the saved phase
    else:
        print("warning: --random-weights: the exported model is untrained")
    return model.eval()


def norm_stats(cfg: Any) -> Tuple[Optional[List[float]], Optional[List[float]]]:
    """``(mean, std)`` of the config's eval transform (``None`` when it has none)."""
    for split in ("test", "val", "train"):
        sc = cfg.data[split]
        if sc.name and sc.transform.name:
            kw = sc.transform.kwargs
            as_list = (lambda v: None if v is None else [float(a) for a in (v if isinstance(v, (list, tuple)) else [v])])
            return as_list(kw.get("mean")), as_list(kw.get("std"))
    return None, None


def export_target(model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]
                  ) -> Tuple[nn.Module, Callable[[int, int], Any], Dict[str, Any]]:
    """``(module, make_input(batch, seed), info)``: what is exported, its inputs and how they are made."""
    channels = int(cfg.model.input_shape[0])
    mean, std = norm_stats(cfg)

    def images(batch: int, seed: int) -> torch.Tensor:  # [B, C, H, W] in [0, 1]; odd seeds darker / brighter
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, channels, *size, generator=g) ** (0.5 if seed % 2 else 2.0)

    if cfg.task == "detection":
        return detection_target(model, what, images)
    m = torch.tensor(mean).view(1, -1, 1, 1) if mean else torch.zeros(1)
    sd = torch.tensor(std).view(1, -1, 1, 1) if std else torch.ones(1)
    info = {"mean": mean, "std": std, "input": "normalised",
            "preprocess": "images in [0, 1], (x - mean) / std" if mean else "images in [0, 1]"}
    module = model if what == "model" else find_backbones(model)[0]
    info["exported"] = f"{type(model).__name__}" if what == "model" else f"{type(module).__name__} (the backbone)"
    return module, (lambda b, s: (images(b, s) - m) / sd), info


def detection_target(model: nn.Module, what: str, images: Callable[[int, int], torch.Tensor]
                     ) -> Tuple[nn.Module, Callable[[int, int], Any], Dict[str, Any]]:
    """:func:`export_target` of a Faster R-CNN: the whole detector when torch.export captures it (not on
    torchvision 0.29: data-dependent NMS), else its backbone + FPN on the preprocessed batch."""
    t = model.transform
    info: Dict[str, Any] = {"mean": list(t.image_mean), "std": list(t.image_std), "input": "preprocessed",
                            "preprocess": f"images in [0, 1], normalised with mean / std, resized to "
                                          f"min_size={t.min_size} / max_size={t.max_size}, padded to a multiple "
                                          f"of {model.size_divisibility}"}
    if what == "backbone":
        info["exported"] = "PCEBackbone (model.backbone.body, the backbone)"
        return model.pce_backbone, (lambda b, s: model.preprocess(list(images(b, s)))), info
    ep, why = whole_detector(model, images)
    if ep is not None:
        info.update(exported="the whole Faster R-CNN", input="images in [0, 1]", preprocess="none (inside)")
        return model, (lambda b, s: list(images(b, s))), info
    print(f"note: the whole Faster R-CNN does not export on torch {torch.__version__} / torchvision "
          f"{_torchvision_version()} ({why}); exporting its backbone + FPN (model.backbone: preprocessed "
          f"[B, 3, H, W] -> FPN maps) instead; run the RPN / RoI heads and NMS in eager PyTorch")
    info.update(exported="backbone + FPN (model.backbone) of Faster R-CNN", whole_model_error=why)
    return model.backbone, (lambda b, s: model.preprocess(list(images(b, s)))), info


def _torchvision_version() -> str:
    import torchvision
    return torchvision.__version__


def whole_detector(model: nn.Module, images: Callable[[int, int], torch.Tensor]
                   ) -> Tuple[Optional[torch.export.ExportedProgram], str]:
    """``(program, "")`` when torch.export captures the whole Faster R-CNN (a list of images in [0, 1]), else
    ``(None, why not)`` in one line."""
    try:  # torch.export prints the whole partial graph to stderr on this failure
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, (list(images(1, 0)),)), ""
    except Exception as e:  # noqa: BLE001 - any capture failure means: export the backbone + FPN
        return None, one_line(e).split("; consider")[0].split("  (Size-like")[0][:300]


# -- capture, run, compare ----------------------------------------------------------------------------------------
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


def write_file(ep: torch.export.ExportedProgram, fmt: str, path: Path, names: List[str]
               ) -> Callable[[Any], List[torch.Tensor]]:
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


def compare(reference: nn.Module, runner: Callable[[Any], List[torch.Tensor]], inputs: Sequence[Any],
            names: List[str]) -> Tuple[Dict[str, float], Dict[str, float]]:
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


def run(args: argparse.Namespace) -> int:
    out, sidecar = output_paths(args)
    cfg = load_config(args.config, args.cfg_options)
    model = load_model(cfg, get_task(cfg.task), args)
    size = tuple(args.input_size) if args.input_size else tuple(int(v) for v in cfg.model.input_shape[1:])
    module, make_input, info = export_target(model, cfg, args.what, size)
    if args.dynamic_batch and not isinstance(make_input(1, 0), torch.Tensor):
        raise PCEError("--dynamic-batch", "the whole detector takes a list of images", "leave it out")
    b = args.batch_size
    example = make_input(b, 0)
    checks = [make_input(b, 1), make_input(b, 2)] + ([make_input(1, 3), make_input(b + 3, 4)]
                                                     if args.dynamic_batch else [])
    target = copy.deepcopy(module)  # what is exported; ``module`` stays the eager reference
    target = target.eval() if args.no_fuse else fuse_for_inference(target)
    with torch.no_grad():
        names = output_names(module(example), args.what)
    shape = list(tree_flatten(example)[0][0].shape)
    print(f"exporting {info['exported']}: input {shape}{' (dynamic batch)' if args.dynamic_batch else ''} "
          f"-> {', '.join(names)}; {_num_norms(module) - _num_norms(target)} batch norms folded")
    ep = capture(target, example, args.dynamic_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")  # moved into place once checked
    try:
        runner = write_file(ep, args.format, tmp, names)
        diff, scale = compare(module, runner, checks, names)
        changed, layers = routing_changes(module, checks)
        print(f"checked on {len(checks)} held-back inputs (batch sizes "
              f"{', '.join(str(tree_flatten(x)[0][0].shape[0]) for x in checks)}); "
              + (f"top-1 routing differs between two of them in {changed} of {layers} PCE layers" if layers
                 else "no PCE layers (a dense model)"))
        for n in names:
            print(f"  {n}: max |{args.format} - eager| = {diff[n]:.3g} (max |eager| = {scale[n]:.3g})")
        bad = [n for n in names if diff[n] > args.atol * max(1.0, scale[n])]
        if bad:
            raise PCEError(out, f"output {bad[0]}: max |{args.format} - eager| = {diff[bad[0]]:.3g} is above "
                           f"--atol {args.atol:g} x max(1, {scale[bad[0]]:.3g}); nothing written",
                           "outputs equal to the eager model's; try --no-fuse, or report it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": args.format, "file": out.name, "config": str(args.config), "checkpoint": args.checkpoint,
            "weights": "checkpoint" if args.checkpoint else "random", "what": args.what, **info,
            "input_name": "images", "input_shape": shape, "dynamic_batch": args.dynamic_batch,
            "output_names": names, "max_abs_diff": diff, "max_abs_eager": scale, "atol": args.atol,
            "bn_folded": not args.no_fuse, "routing_under_capture": "capacity execution (equal to sparse when "
            "no token overflows)", "versions": _versions(args.format)}
    sidecar.write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} and {sidecar}")
    return 0


def _versions(fmt: str) -> Dict[str, str]:
    v = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime
        v.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return v


if __name__ == "__main__":
    sys.exit(main())
