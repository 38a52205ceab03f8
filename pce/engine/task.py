"""The task contract: everything the engine, the analysis tools and the command-line tools may ask of a task.

A task adapter (``tasks/<name>/task.py``, registered with ``pce.tasks.register_task``) implements every member
of :class:`Task`; callers ask the task, never test its name. A new task is then one package plus one registry
line for train, eval, infer, export, analysis, slides and report alike. ``tests/test_task_contract.py`` runs
every member for every registered task.

Shapes: images ``[B, C, H, W]`` (a detection batch is a list of ``[C, H_i, W_i]``), one image ``[C, H, W]`` in
``[0, 1]`` before the task's transform, a routing grid ``(gh, gw)`` of ``P = gh * gw`` patches.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import nn

__all__ = ["Task", "Evaluator", "ExportTarget"]

# (module to export, make_input(batch, seed) -> its example inputs, info written to the export's sidecar)
ExportTarget = Tuple[nn.Module, Callable[[int, int], Any], Dict[str, Any]]


@runtime_checkable
class Evaluator(Protocol):
    """What ``build_evaluator`` returns: ``update(*task.predict(...))`` per batch, ``compute()`` at the end;
    under DDP also ``synchronize()`` or ``state_dict()`` / ``merge(state)`` / ``reset()``."""

    def update(self, *args: Any) -> None: ...

    def compute(self) -> Dict[str, Any]: ...


@runtime_checkable
class Task(Protocol):
    """One vision task (classification, detection, segmentation, ...) as the rest of PCE sees it."""

    name: str
    #: ``DataLoader`` collate function of the task's batches (``None``: torch's default collate)
    collate_fn: Optional[Callable[[List[Any]], Any]]
    #: how a slide is tiled for whole-slide inference: ``"classify"`` (one probability per tile),
    #: ``"segment"`` (a probability per pixel) or ``None`` (the task cannot run on slides)
    slide_tile_mode: Optional[str]

    # ------------------------------------------------------------------------------------------ model and data
    def build_model(self, cfg: Any) -> nn.Module:
        """The task's model of ``cfg.model`` (PCE or dense backbone), untrained."""

    def build_datasets(self, cfg: Any, splits: Sequence[str] = ("train", "val"), evaluate: bool = False
                       ) -> Dict[str, Any]:
        """The configured ones of ``splits`` (a split without ``data.<split>.name`` is left out); ``evaluate``:
        without augmentation (as the model is evaluated on them, whatever the split)."""

    def set_epoch(self, epoch: int) -> None:
        """Re-seed the training augmentation for ``epoch`` (exact resume)."""

    def dummy_inputs(self, cfg: Any, batch_size: int = 1) -> Tuple[Any, ...]:
        """Example model inputs of ``model.input_shape`` (FLOP counting, tracing)."""

    # ------------------------------------------------------------------------------------ training, evaluation
    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """Loss terms of one batch (their sum is the loss), the router loss included."""

    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[Any, ...]:
        """``(predictions, targets)`` of one batch: the arguments of ``evaluator.update``."""

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> Evaluator:
        """A fresh evaluator for ``dataset`` (class names from it when it has them)."""

    def batch_images(self, batch: Any) -> Any:
        """The images of a batch (``[B, C, H, W]``, or a list for detection)."""

    def batch_size(self, batch: Any) -> int:
        """The number of images in a batch."""

    # ------------------------------------------------------------------- a user's own images (infer, analysis)
    def empty_target(self, image: torch.Tensor) -> Any:
        """The target of an unannotated image ``[C, H, W]`` (what the transforms and the collate need)."""

    def prepare_image(self, cfg: Any, image: torch.Tensor, transform: Any) -> Tuple[torch.Tensor, Any]:
        """``(model input [C, H', W'], target)`` of a user's image ``[C, H, W]`` in [0, 1] through the evaluation
        ``transform`` (``None``: none), resized where the task's model needs a fixed size."""

    def min_input_side(self, cfg: Any, model: nn.Module) -> int:
        """The smallest image side the task's model accepts (1 when any size is resized to fit)."""

    def to_input_frame(self, output: Any, model_input_size: Tuple[int, int], original_size: Tuple[int, int]
                       ) -> Any:
        """One image's prediction (``predict(...)[0][i]``, in the frame of the model input ``prepare_image`` made,
        ``model_input_size = (H', W')``) in the user's image's own frame ``original_size = (H, W)``: boxes scaled,
        label maps resized (nearest), image-level outputs as they are."""

    def summarize(self, output: Any, class_names: Optional[Sequence[str]], score_thr: float = 0.5
                  ) -> Dict[str, Any]:
        """A JSON-ready summary of one image's prediction (``predict(...)[0][i]``)."""

    def render(self, image: torch.Tensor, output: Any, class_names: Optional[Sequence[str]] = None,
               score_thr: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
        """A picture (uint8 ``[3, H, W]``) of one image's prediction or ground truth on ``image`` (``[C, H, W]``
        in [0, 1], in the frame of ``output``: as the model saw it, or the user's image after
        :meth:`to_input_frame`)."""

    # ----------------------------------------------------------------------------------- routing statistics
    def patch_labels(self, batch: Any, grid: Tuple[int, int], num_classes: Optional[int] = None
                     ) -> Optional[torch.Tensor]:
        """``int64 [B, gh * gw]``: the class under every patch of a routing grid, from the batch's own targets
        (``-1``: no class); ``None`` when the batch carries no targets."""

    def image_labels(self, batch: Any) -> Optional[torch.Tensor]:
        """``int64 [B]`` image-level class labels when the task has them (classification), else ``None``."""

    # ---------------------------------------------------------------------------------------------- export
    def export_target(self, model: nn.Module, cfg: Any, what: str, size: Tuple[int, int]) -> ExportTarget:
        """What ``tools/export.py`` captures for ``what`` (``"model"`` or ``"backbone"``) at input ``size``:
        ``(module, make_input(batch, seed), info)``."""
