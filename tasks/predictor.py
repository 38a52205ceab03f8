"""A trained model as a Python function: :class:`Predictor` (issue #24), like MMDetection's ``DetInferencer`` or
Detectron2's ``DefaultPredictor``.

    from pce.tasks import Predictor

    predictor = Predictor.from_checkpoint("configs/demo_det_pce.py", "work_dirs/demo_det_pce/best.pth")
    result = predictor("photo.jpg")                  # or a PIL image, a numpy array, a tensor; or a list of them
    result.boxes, result.labels, result.scores, result.names   # in photo.jpg's own pixel coordinates
    picture = result.render()                        # uint8 [3, H, W]: the prediction drawn on the photo

(``pce.Predictor`` does not exist: ``pce`` sits below the tasks in the layer contract, so the import is
``from pce.tasks import Predictor``.)

The model is loaded by :func:`pce.tasks.tooling.load_run`, i.e. :func:`pce.engine.evaluation.load_trained_weights`
(the expert structure of a pruned checkpoint, EMA weights, the routing of the phase it was saved in), with
``runtime.num_threads`` applied, in eval mode; every forward runs under ``torch.no_grad``. Each image goes through
the config's evaluation transform and the task's ``prepare_image`` / ``predict``; the prediction is brought back to
the input image's own frame (``task.to_input_frame``), summarised (``task.summarize``) and drawn
(``task.render``). Nothing here knows a task by name: what differs between tasks is asked of the task adapter.

Inputs (one, or a list / tuple of them): a path (``str`` / ``os.PathLike``, read as ``tools/infer.py`` reads it),
a PIL image, a numpy array (``[H, W]`` grayscale or ``[H, W, C]``, C in 1, 3, 4 (alpha dropped); ``uint8`` /
``uint16`` scaled by 255 / 65535, floats in [0, 1]) or a tensor ``[C, H, W]`` (``[H, W]``) in [0, 1] (``uint8``:
scaled by 255). Images are converted to the model's ``model.input_shape[0]`` channels (RGB -> gray by the
ITU-R 601 luma weights PIL uses, gray -> RGB by repetition), checked against ``data.max_input_size`` and the
task's ``min_input_side``. A bad input is a :class:`pce.engine.errors.PCEError` naming the item (its path, or
``images[i]``).

Batching: ``predictor(images, batch_size=n)`` runs up to ``n`` images per forward; images whose model inputs
differ in size are never padded into one batch, so every result equals the one-at-a-time result.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import default_collate

from pce.engine.errors import PCEError

from .tooling import check_size, eval_transform, load_image, load_run

__all__ = ["Predictor", "Result"]

_KINDS = "a path, a PIL image, a numpy array [H, W] / [H, W, C] or a tensor [C, H, W]"
_LUMA = (0.299, 0.587, 0.114)  # PIL's Image.convert("L") weights


@dataclass
class Result:
    """One image's prediction, in the input image's own frame.

    ``output``: the task's prediction after ``task.to_input_frame`` (logits ``[K]``, a dict of per-instance
    tensors, a label map ``[H, W]``, ...); ``summary``: ``task.summarize(output)`` (what ``tools/infer.py`` writes
    to predictions.json); ``image``: the input as ``[C, H, W]`` in [0, 1]; ``image_size`` / ``model_input_size``:
    ``(H, W)`` of the input and of what the model saw; ``routing``: with ``routing=True``, per routed layer (its
    module name) the weights ``[P, E]`` of this image (a list of them when the layer ran several times for one
    batch), else ``None``.

    The task's fields are attributes: an image-level output (logits ``[K]``) gives ``classes`` / ``scores`` (the
    top-k classes and their softmax probabilities), ``names`` and ``logits``; a dict of per-instance tensors gives
    each of them (``boxes``, ``labels``, ``scores``: the instances scoring at least ``score_thr``) and ``names``; a
    dense output gives ``label_map`` (``[H, W]``); every key of ``summary`` is an attribute too. ``fields`` lists
    them all.
    """

    output: Any
    summary: Dict[str, Any]
    image: torch.Tensor
    image_size: Tuple[int, int]
    model_input_size: Tuple[int, int]
    routing: Optional[Dict[str, Any]] = None
    fields: Dict[str, Any] = field(default_factory=dict, repr=False)
    _render: Optional[Callable[..., torch.Tensor]] = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "fields":
            raise AttributeError(name)
        fields = self.__dict__.get("fields", {})
        if name in fields:
            return fields[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; this task's fields: {sorted(fields)}")

    def render(self, score_thr: Optional[float] = None, alpha: float = 0.5) -> torch.Tensor:
        """The prediction drawn on the original image (``task.render``): uint8 ``[3, H, W]``."""
        return self._render(score_thr=score_thr, alpha=alpha)


def _fields(output: Any, summary: Mapping, names: Optional[Sequence[str]], score_thr: float, topk: int
            ) -> Dict[str, Any]:
    """The attributes of a :class:`Result`, by the form of the output (never by the task's name)."""
    out: Dict[str, Any] = dict(summary)
    if isinstance(output, Mapping):  # per-instance tensors; those scoring below score_thr left out, as summarize
        scores = output.get("scores")
        keep = torch.as_tensor(scores) >= score_thr if scores is not None else None
        for k, v in output.items():
            if keep is not None and torch.is_tensor(v) and v.dim() and len(v) == len(keep):
                v = v[keep]
            out[k] = v
    elif torch.is_tensor(output) and output.dim() == 1:  # image-level logits [K]
        prob = output.float().softmax(-1)
        top = prob.topk(min(int(topk), prob.numel()))
        out.update(logits=output, classes=top.indices, scores=top.values,
                   names=[names[int(i)] if names and int(i) < len(names) else str(int(i)) for i in top.indices])
    elif torch.is_tensor(output):  # a dense prediction: a label map [H, W]
        out["label_map"] = output
    return out


class Predictor:
    """``Predictor.from_checkpoint(config, checkpoint)(images)`` -> :class:`Result` (one image) or a list of them.

    ``score_thr``: the smallest score kept in per-instance fields, summaries and pictures; ``topk``: how many
    classes an image-level prediction lists."""

    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, device: torch.device, score_thr: float = 0.5,
                 topk: int = 5) -> None:
        from .visualize import class_names_from_config

        self.cfg, self.task, self.model, self.device = cfg, task, model.eval(), device
        self.score_thr, self.topk = float(score_thr), int(topk)
        self.transform = eval_transform(cfg)
        self.class_names = class_names_from_config(cfg)
        self.channels = int(cfg.model.input_shape[0])
        self.min_side = int(task.min_input_side(cfg, model))
        self.max_side = int(cfg.data.max_input_size or 0)
        self.collate = getattr(task, "collate_fn", None) or default_collate

    @classmethod
    def from_checkpoint(cls, config: Union[str, os.PathLike], checkpoint: Union[str, os.PathLike],
                        device: Optional[str] = None, cfg_options: Optional[Sequence[str]] = None,
                        score_thr: float = 0.5, topk: int = 5) -> "Predictor":
        """The trained model of ``checkpoint`` (a .pth of ``tools/train.py`` / ``tools/prune_experts.py``) built
        from ``config`` (``cfg_options``: ``KEY=VALUE`` overrides as ``--cfg-options``), on ``device`` (``cpu`` |
        ``cuda`` | ``auto``; default ``runtime.device``), loaded as every tool loads it
        (:func:`pce.tasks.tooling.load_run`)."""
        args = SimpleNamespace(config=str(config), checkpoint=str(checkpoint), device=device,
                               cfg_options=list(cfg_options or []))
        cfg, task, model, _, dev = load_run(args)
        return cls(cfg, task, model, dev, score_thr=score_thr, topk=topk)

    # ------------------------------------------------------------------------------------------------ images
    def load(self, item: Any, where: Optional[str] = None) -> torch.Tensor:
        """One input as ``[C, H, W]`` float in [0, 1] with the model's channels, size-checked; ``PCEError`` naming
        ``where`` (default: the path, or the item's type)."""
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise PCEError(item, "image not found", "an image file")
            image = load_image(item, self.channels, max_side=self.max_side)
            check_size(item, image, self.min_side, self.max_side)
            return image
        where = where or f"a {type(item).__module__}.{type(item).__name__}"
        from PIL import Image

        if isinstance(item, Image.Image):
            from pce.datasets.voc_images import PixelValueError, image_to_array

            try:
                arr = image_to_array(item, self.channels, where=where)
            except PixelValueError as e:
                raise PCEError(where, e.what, e.expected) from None
            image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        elif isinstance(item, np.ndarray) and item.dtype in (np.uint8, np.uint16) and (
                item.ndim == 2 or (item.ndim == 3 and item.dtype == np.uint8 and item.shape[-1] in (1, 3, 4))):
            # integer pixels as a file of them would hold: through PIL, exactly as the same pixels read from a file
            im = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
            return self.load(im, where)
        elif isinstance(item, np.ndarray):
            image = self._from_hwc(item, where)
        elif torch.is_tensor(item):
            t = item.detach().cpu()
            if t.dim() == 3:
                t = t.permute(1, 2, 0)
            elif t.dim() != 2:
                raise PCEError(where, f"a tensor of shape {list(item.shape)} is not an image",
                               "a tensor [C, H, W] or [H, W] in [0, 1]")
            image = self._from_hwc(t.numpy(), where, layout="[C, H, W]")
        else:
            raise PCEError(where, f"a {type(item).__name__} is not an image", _KINDS)
        check_size(where, image, self.min_side, self.max_side)
        return image

    def _from_hwc(self, arr: np.ndarray, where: str, layout: str = "[H, W, C]") -> torch.Tensor:
        """An ``[H, W]`` / ``[H, W, C]`` array (C in 1, 3, 4) as ``[channels, H, W]`` float in [0, 1]."""
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
            raise PCEError(where, f"an array of shape {list(arr.shape)} is not an image",
                           f"{layout} with 1, 3 or 4 channels, or [H, W]")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
            bad = ~np.isfinite(arr)
            if bad.any():
                raise PCEError(where, f"{int(bad.sum())} NaN / infinite pixel value(s) of {arr.size}",
                               "finite pixel values in [0, 1]")
            if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
                raise PCEError(where, f"float pixel values span [{float(arr.min()):g}, {float(arr.max()):g}], "
                               "outside [0, 1]", "a float image scaled to [0, 1], or uint8 / uint16 pixels")
            arr = np.clip(arr, 0.0, 1.0)
        else:
            raise PCEError(where, f"pixels of type {arr.dtype} are not supported", "uint8, uint16 or float in [0, 1]")
        arr = arr[..., :3] if arr.shape[-1] == 4 else arr  # alpha dropped
        if self.channels == 1 and arr.shape[-1] == 3:
            arr = (arr * np.asarray(_LUMA, dtype=np.float32)).sum(-1, keepdims=True)
        elif self.channels == 3 and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()

    # ----------------------------------------------------------------------------------------------- predict
    def __call__(self, images: Any, batch_size: int = 1, routing: bool = False
                 ) -> Union[Result, List[Result]]:
        """The :class:`Result` of one image, or the list of results of a list / tuple of images (in order)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise PCEError("batch_size", f"{batch_size!r} is not a positive integer", "1, 2, ...")
        loaded = [self.load(item, None if single else f"images[{i}]") for i, item in enumerate(items)]
        results = self.predict_images(loaded, batch_size=batch_size, routing=routing)
        return results[0] if single else results

    def predict_images(self, images: Sequence[torch.Tensor], batch_size: int = 1, routing: bool = False
                       ) -> List[Result]:
        """Results of loaded images ``[C, H, W]`` in [0, 1] (:meth:`load`), in order."""
        samples = [self.task.prepare_image(self.cfg, im, self.transform) for im in images]
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, (x, _) in enumerate(samples):  # never pad images of different sizes into one batch
            groups.setdefault(tuple(x.shape), []).append(i)
        results: List[Optional[Result]] = [None] * len(samples)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                preds, maps = self._forward([samples[i] for i in chunk], routing)
                for j, i in enumerate(chunk):
                    results[i] = self._result(images[i], tuple(samples[i][0].shape[-2:]), preds[j],
                                              None if maps is None else {k: _pick(v, j, len(chunk), k)
                                                                         for k, v in maps.items()})
        return results  # type: ignore[return-value]

    def _forward(self, samples: List[Any], routing: bool) -> Tuple[List[Any], Optional[Dict[str, List[Any]]]]:
        batch = self.collate(samples)
        with torch.no_grad():
            if not routing:
                return list(self.task.predict(self.model, batch, self.device)[0]), None
            from pce.moe.recorder import record_routing

            with record_routing(self.model, detach=True) as rec:
                preds = self.task.predict(self.model, batch, self.device)[0]
            maps: Dict[str, List[Any]] = {}
            for name, res in zip(rec.names, rec.results):
                maps.setdefault(name, []).append(res.weights.float().cpu())
            return list(preds), maps

    def _result(self, image: torch.Tensor, model_size: Tuple[int, int], pred: Any,
                routing: Optional[Dict[str, Any]]) -> Result:
        pred = {k: _cpu(v) for k, v in pred.items()} if isinstance(pred, Mapping) else _cpu(pred)
        image_size = (int(image.shape[-2]), int(image.shape[-1]))
        out = self.task.to_input_frame(pred, model_size, image_size)
        summary = self.task.summarize(out, self.class_names, self.score_thr)
        task, names, thr = self.task, self.class_names, self.score_thr

        def render(score_thr: Optional[float] = None, alpha: float = 0.5) -> torch.Tensor:
            return task.render(image, out, names, score_thr=thr if score_thr is None else float(score_thr),
                               alpha=alpha)

        return Result(output=out, summary=summary, image=image, image_size=image_size,
                      model_input_size=tuple(int(v) for v in model_size), routing=routing,
                      fields=_fields(out, summary, names, self.score_thr, self.topk), _render=render)


def _cpu(x: Any) -> Any:
    return x.detach().cpu() if torch.is_tensor(x) else x


def _pick(weights: List[torch.Tensor], j: int, n: int, name: str) -> Any:
    """Image ``j`` of a batch of ``n``: ``[P, E]`` of a layer that ran once, a list of them when it ran again."""
    for w in weights:
        if w.dim() != 3 or w.shape[0] != n:
            raise PCEError(f"routing of {name}", f"weights of shape {list(w.shape)} for a batch of {n} image(s)",
                           "one routing row block per image: whole-image inference")
    return weights[0][j] if len(weights) == 1 else [w[j] for w in weights]
