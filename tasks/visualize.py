"""Drawing helpers for the tools (``tools/infer.py``, ``tools/browse_dataset.py``): boxes with labels and scores,
colour overlays of segmentation masks, a captioned frame (an image-level label), denormalisation and PNG writing, and
:func:`class_names_from_config`. Each task adapter's ``render`` picks the primitive of its predictions.

Images are ``[3, H, W]`` tensors: ``uint8``, or float in ``[0, 1]`` (clamped). Every helper returns a new
``uint8 [3, H, W]`` tensor and never modifies its input. Detection labels follow the evaluator's convention:
label ``c`` (``1..C``, 0 = background) is named ``class_names[c - 1]``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes

__all__ = ["to_uint8_image", "denormalize", "display_image", "palette_colors", "draw_detections", "overlay_mask",
           "caption_frame", "class_names_from_config", "save_png"]

Palette = Union[Sequence[int], Sequence[Sequence[int]], np.ndarray, torch.Tensor]


def to_uint8_image(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` (or ``[1, H, W]`` / ``[H, W]`` grey) uint8 or float in [0, 1] -> uint8 ``[3, H, W]`` (a copy)."""
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(np.asarray(image))
    img = image.detach().cpu()
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [3, H, W] (or grey [1, H, W] / [H, W]), got {tuple(image.shape)}")
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if img.dtype == torch.uint8:
        return img.clone().contiguous()
    if not img.is_floating_point():
        raise TypeError(f"integer images must be uint8, got {img.dtype}")
    return (img.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` of a float ``[3, H, W]`` image -> float in [0, 1] (clamped)."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.detach().cpu().float() * s + m).clamp(0, 1)


def display_image(image: torch.Tensor, transform: Any = None) -> torch.Tensor:
    """The viewable ``[C, H, W]`` float image in [0, 1] of a transformed sample: undoes the normalisation of
    transforms that have ``mean`` / ``std`` attributes (segmentation, classification); others (detection) are
    already in [0, 1]."""
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is not None and std is not None and image.is_floating_point():
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        sd = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        C = image.shape[0]
        return denormalize(image, m.expand(C) if m.numel() == 1 else m, sd.expand(C) if sd.numel() == 1 else sd)
    return image.detach().cpu()


def palette_colors(palette: Palette) -> np.ndarray:
    """A palette as ``uint8 [N, 3]``: a flat ``[r0, g0, b0, r1, ...]`` list (PIL / ``VOC_PALETTE``) or ``[N, 3]``."""
    arr = palette.detach().cpu().numpy() if isinstance(palette, torch.Tensor) else np.asarray(palette)
    if arr.ndim == 1:
        if arr.size % 3:
            raise ValueError(f"a flat palette needs a multiple of 3 entries, got {arr.size}")
        arr = arr.reshape(-1, 3)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"palette must be flat RGB triples or [N, 3], got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError("palette colours must be in 0..255")
    return arr.astype(np.uint8)


def _default_palette() -> np.ndarray:
    from pce.datasets.voc_format import VOC_PALETTE  # the standard VOC colour map (index 0 black)

    return palette_colors(VOC_PALETTE)


def _label_text(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return str(label)


def draw_detections(image: torch.Tensor, boxes, labels=None, scores=None,
                    class_names: Optional[Sequence[str]] = None, score_thr: float = 0.0,
                    palette: Optional[Palette] = None, width: int = 2,
                    font: Optional[str] = None, font_size: Optional[int] = None) -> torch.Tensor:
    """Boxes (``[N, 4]`` xyxy pixels) with ``"name 0.87"`` captions -> uint8 ``[3, H, W]``.

    Args:
        image: ``[3, H, W]`` uint8 or float in [0, 1].
        boxes, labels (``[N]``, 1..C), scores (``[N]`` or None): tensors, arrays or lists.
        class_names: names of labels ``1..C`` (``class_names[c - 1]``); unknown labels are drawn as numbers.
        score_thr: boxes with a score below it are not drawn.
        palette: box colour of label ``c`` is ``palette[c]`` (default the VOC colour map; label 0 / black
            entries are drawn white so they stay visible).
        width, font, font_size: passed to :func:`torchvision.utils.draw_bounding_boxes`.
    """
    img = to_uint8_image(image)
    b = torch.as_tensor(np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes),
                        dtype=torch.float32).reshape(-1, 4)
    n = b.shape[0]
    lab = (torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
           .reshape(-1).long() if labels is not None else torch.zeros(n, dtype=torch.long))
    sc = (torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores),
                          dtype=torch.float32).reshape(-1) if scores is not None else None)
    if lab.numel() != n or (sc is not None and sc.numel() != n):
        raise ValueError(f"boxes ({n}), labels ({lab.numel()}) and scores "
                         f"({None if sc is None else sc.numel()}) must have the same length")
    keep = torch.ones(n, dtype=torch.bool) if sc is None else sc >= score_thr
    b, lab = b[keep], lab[keep]
    sc = sc[keep] if sc is not None else None
    if b.shape[0] == 0:
        return img
    H, W = img.shape[-2:]
    b[:, 0::2] = b[:, 0::2].clamp(0, W - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, H - 1)
    colors_arr = palette_colors(palette) if palette is not None else _default_palette()
    colors = []
    for c in lab.tolist():
        rgb = tuple(int(v) for v in colors_arr[c % len(colors_arr)])
        colors.append((255, 255, 255) if rgb == (0, 0, 0) else rgb)
    texts = None
    if labels is not None or sc is not None:
        texts = []
        for i, c in enumerate(lab.tolist()):
            name = _label_text(c, class_names) if labels is not None else ""
            texts.append(f"{name} {float(sc[i]):.2f}".strip() if sc is not None else name)
    return draw_bounding_boxes(img, b, labels=texts, colors=colors, width=width, font=font, font_size=font_size)


def overlay_mask(image: torch.Tensor, mask, palette: Optional[Palette] = None, alpha: float = 0.5,
                 skip: Sequence[int] = (0,)) -> torch.Tensor:
    """Colour overlay of a class-index mask ``[H, W]`` on ``image`` -> uint8 ``[3, H, W]``.

    Pixel of class ``c``: ``(1 - alpha) * image + alpha * palette[c]`` (so ``alpha=1`` gives the palette
    colour exactly); classes in ``skip`` (default the background 0) keep the image. Classes beyond the
    palette wrap around. ``palette`` defaults to the VOC colour map (255 = void, drawn in its cream colour
    unless skipped).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = to_uint8_image(image)
    m = torch.as_tensor(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)).long()
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != img.shape[-2:]:
        raise ValueError(f"mask {tuple(m.shape)} and image {tuple(img.shape[-2:])} must have the same size")
    if m.numel() and int(m.min()) < 0:
        raise ValueError("mask values must be non-negative class indices")
    colors = torch.from_numpy(palette_colors(palette) if palette is not None else _default_palette())
    col = colors[m % colors.shape[0]].permute(2, 0, 1).float()  # [3, H, W]
    out = (1.0 - alpha) * img.float() + alpha * col
    out = out.round().clamp(0, 255).to(torch.uint8)
    keep = torch.zeros_like(m, dtype=torch.bool)
    for c in skip:
        keep |= m == int(c)
    return torch.where(keep.unsqueeze(0), img, out)


def caption_frame(image: torch.Tensor, label: int, score: Optional[float] = None,
                  class_names: Optional[Sequence[str]] = None, palette: Optional[Palette] = None) -> torch.Tensor:
    """A one-pixel frame around the whole image captioned ``"name score"`` (``"name"`` without a score) ->
    uint8 ``[3, H, W]``; ``class_names[label]`` names ``label`` (0-based; unknown labels are drawn as numbers),
    its colour is ``palette[label + 1]`` (default the VOC colour map)."""
    img = to_uint8_image(image)
    H, W = img.shape[-2:]
    names = ["background"] + list(class_names) if class_names is not None else None
    scores = None if score is None else [float(score)]
    return draw_detections(img, [[0, 0, W - 1, H - 1]], [int(label) + 1], scores, names, palette=palette, width=1)


def class_names_from_config(cfg: Any) -> Optional[List[str]]:
    """Class names of a config's data without reading the data: the first of ``data.{test,val,train}`` that
    sets ``kwargs.classes``, else the demo's classes for ``kwargs.demo``, else the default ``classes`` of the
    registered dataset class (VOC's 20 names), else its ``classes`` attribute; ``None`` when unknown."""
    import inspect

    from pce.datasets import DATASETS
    from pce.datasets.demo_voc import DEMO_CLASSES

    for split in ("test", "val", "train"):
        sc = cfg.data[split]
        if not sc.name:
            continue
        kwargs = sc.kwargs
        if kwargs.get("classes"):
            return [str(c) for c in kwargs["classes"]]
        if kwargs.get("demo"):
            return list(DEMO_CLASSES)
        try:
            cls = DATASETS.get(sc.name)
        except KeyError:
            continue
        if callable(getattr(cls, "classes_for", None)):  # names that depend on the kwargs (Camelyon's mode)
            return [str(c) for c in cls.classes_for(**kwargs)]
        try:
            p = inspect.signature(cls).parameters.get("classes")
        except (TypeError, ValueError):
            p = None
        default = p.default if p is not None else None
        if isinstance(default, (list, tuple)) and default:
            return [str(c) for c in default]
        attr = getattr(cls, "classes", None)
        if isinstance(attr, (list, tuple)) and attr:
            return [str(c) for c in attr]
    return None


def save_png(image: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    """Write a ``[3, H, W]`` image (uint8 or float in [0, 1]) as PNG, creating the folder. Atomic (a temp file
    beside ``path``, then ``os.replace``: never half a file); a failed write (a full disk, ...) is a ``PCEError``
    naming ``path``, with the previous file kept. Returns the path."""
    from PIL import Image

    from .atomic_io import atomic_write

    arr = to_uint8_image(image).permute(1, 2, 0).numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
