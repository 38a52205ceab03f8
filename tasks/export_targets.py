"""What ``tools/export.py`` captures of a task's model: ``(module, make_input(batch, seed), info)``, the
:data:`pce.engine.task.ExportTarget` that a task adapter's ``export_target`` returns.

Two task-free builders, one per kind of model input:

* :func:`image_export_target`: models that take a normalised image batch ``[B, C, H, W]`` (classification,
  segmentation): ``"model"`` exports the model, ``"backbone"`` its (first) PCE / dense backbone;
* :func:`detection_export_target`: a torchvision detector of any head (``model.head.arch``: Faster / Mask R-CNN,
  RetinaNet, FCOS; ``tasks/detection/model.py``): the whole detector when ``torch.export`` captures it (not on
  torchvision 0.29: data-dependent NMS), else its backbone + FPN on the detector's own preprocessed batch;
  ``"backbone"`` exports the PCE backbone on that batch.

``make_input(batch, seed)`` draws held-back random images in [0, 1] (odd seeds brighter, even seeds darker, so two
seeds route differently) and turns them into what the exported module takes; ``info`` (mean / std, how inputs are
made, what was exported) goes into the export's sidecar JSON.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from pce.engine.errors import one_line
from pce.engine.phases import find_backbones
from pce.engine.task import ExportTarget

__all__ = ["norm_stats", "random_images", "image_export_target", "detection_export_target", "whole_detector",
           "detector_name"]

Images = Callable[[int, int], torch.Tensor]


def norm_stats(cfg: Any) -> Tuple[Optional[List[float]], Optional[List[float]]]:
    """``(mean, std)`` of the config's eval transform (``None`` when it has none)."""
    for split in ("test", "val", "train"):
        sc = cfg.data[split]
        if sc.name and sc.transform.name:
            kw = sc.transform.kwargs
            return _floats(kw.get("mean")), _floats(kw.get("std"))
    return None, None


def _floats(v: Any) -> Optional[List[float]]:
    return None if v is None else [float(a) for a in (v if isinstance(v, (list, tuple)) else [v])]


def random_images(cfg: Any, size: Tuple[int, int]) -> Images:
    """``images(batch, seed) -> [batch, C, H, W]`` in [0, 1] (``C`` of ``model.input_shape``, ``(H, W) = size``);
    odd seeds brighter, even seeds darker."""
    channels = int(cfg.model.input_shape[0])

    def images(batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, channels, *size, generator=g) ** (0.5 if seed % 2 else 2.0)
    return images


def image_export_target(model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]) -> ExportTarget:
    """The export target of a model on normalised images ``[B, C, H, W]`` (classification, segmentation):
    ``what="model"`` the model, ``"backbone"`` its backbone; inputs normalised with the eval transform's mean /
    std."""
    images = random_images(cfg, size)
    mean, std = norm_stats(cfg)
    m = torch.tensor(mean).view(1, -1, 1, 1) if mean else torch.zeros(1)
    sd = torch.tensor(std).view(1, -1, 1, 1) if std else torch.ones(1)
    info: Dict[str, Any] = {"mean": mean, "std": std, "input": "normalised",
                            "preprocess": "images in [0, 1], (x - mean) / std" if mean else "images in [0, 1]"}
    module = model if what == "model" else find_backbones(model)[0]
    info["exported"] = type(model).__name__ if what == "model" else f"{type(module).__name__} (the backbone)"
    return module, (lambda b, s: (images(b, s) - m) / sd), info


def detection_export_target(model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]) -> ExportTarget:
    """The export target of a detector (``PCEFasterRCNN``, ``PCEMaskRCNN``, ``PCERetinaNet``, ``PCEFCOS``): the
    whole detector when ``torch.export`` captures it, else its backbone + FPN (``model.backbone``) on the
    preprocessed batch, saying so; ``what="backbone"``: the PCE backbone (``model.pce_backbone``) on the
    preprocessed batch."""
    images = random_images(cfg, size)
    t = model.transform
    info: Dict[str, Any] = {"mean": list(t.image_mean), "std": list(t.image_std), "input": "preprocessed",
                            "preprocess": f"images in [0, 1], normalised with mean / std, resized to "
                                          f"min_size={t.min_size} / max_size={t.max_size}, padded to a multiple "
                                          f"of {model.size_divisibility}"}
    preprocessed = (lambda b, s: model.preprocess(list(images(b, s))))
    if what == "backbone":
        info["exported"] = "PCEBackbone (model.backbone.body, the backbone)"
        return model.pce_backbone, preprocessed, info
    ep, why = whole_detector(model, images)
    name = detector_name(model)
    if ep is not None:
        info.update(exported=f"the whole detector ({name})", input="images in [0, 1]", preprocess="none (inside)")
        return model, (lambda b, s: list(images(b, s))), info
    print(f"note: the whole detector ({name}) does not export on torch {torch.__version__} / torchvision "
          f"{_torchvision_version()} ({why}); exporting its backbone + FPN (model.backbone: preprocessed "
          f"[B, 3, H, W] -> FPN maps) instead; run its detection head and NMS in eager PyTorch")
    info.update(exported=f"backbone + FPN (model.backbone) of the detector ({name})", whole_model_error=why)
    return model.backbone, preprocessed, info


def detector_name(model: nn.Module) -> str:
    """The torchvision detector class ``model`` is built on (``"FasterRCNN"``, ``"MaskRCNN"``, ``"RetinaNet"``,
    ``"FCOS"``), else its own class name."""
    return next((c.__name__ for c in type(model).__mro__ if c.__module__.startswith("torchvision.")),
                type(model).__name__)


def _torchvision_version() -> str:
    import torchvision
    return torchvision.__version__


def whole_detector(model: nn.Module, images: Images) -> Tuple[Optional[torch.export.ExportedProgram], str]:
    """``(program, "")`` when torch.export captures the whole detector (a list of images in [0, 1]), else
    ``(None, why not)`` in one line."""
    try:  # torch.export prints the whole partial graph to stderr on this failure
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, (list(images(1, 0)),)), ""
    except Exception as e:  # noqa: BLE001 - any capture failure means: export the backbone + FPN
        return None, one_line(e).split("; consider")[0].split("  (Size-like")[0][:300]
