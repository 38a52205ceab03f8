"""Routing-map pictures during training, for TensorBoard and MLflow: :class:`RoutingMapHook`.

``runtime.routing_maps.interval=N`` (``pce.tasks.hooks.default_hooks`` adds the hook when N > 0): after every N-th
epoch and after the last one, rank 0 draws the routing of the first ``runtime.routing_maps.num_images`` validation
images with the trainer's evaluation model (the EMA copy when there is one), as ``tools/visualize_routing.py`` draws
them (:func:`pce.analysis.maps.routing_maps`, :func:`pce.analysis.plots.routing_figure`), into
``WORK_DIR/routing_maps/epoch_<N>/val_<i>.png``, and hands each picture to the trainer's
:class:`~pce.engine.logging.MetricWriter` (:meth:`~pce.engine.logging.MetricWriter.write_image`): TensorBoard
``add_image`` as ``routing_maps/val_<i>`` at the step of the epoch's last iteration, and the MLflow run (artifact
``routing_maps/epoch_<N>/val_<i>.png``) when ``runtime.mlflow.enable``. Drawing never moves the training's random
streams, and a picture that cannot be drawn is a warning: training goes on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from pce.analysis.maps import routing_maps
from pce.analysis.plots import routing_figure
from pce.engine.checkpoint import capture_rng_state, restore_rng_state
from pce.engine.errors import PCEError
from pce.engine.hooks import HookBase

from .tooling import batches, display

__all__ = ["RoutingMapHook"]

logger = logging.getLogger("pce")


class RoutingMapHook(HookBase):
    """Every ``interval`` epochs (and after the last): the routing maps of the first ``num_images`` validation images
    to ``WORK_DIR/routing_maps/epoch_<N>/`` and the trainer's writer (TensorBoard, MLflow). Rank 0 only."""

    def __init__(self, interval: int, num_images: int = 4, batch_size: int = 8) -> None:
        if interval < 0 or num_images < 0:
            raise PCEError("runtime.routing_maps", f"interval={interval}, num_images={num_images}",
                           "non-negative numbers; interval 0: no pictures")
        self.interval, self.num_images, self.batch_size = int(interval), int(num_images), int(batch_size)
        self.samples: List[Any] = []
        self.names: List[str] = []
        self.transform: Any = None
        self._drawn: Optional[int] = None     # the iteration last drawn (a max_iters stop: not twice)
        self._warned = False

    def before_train(self) -> None:
        trainer = self.trainer
        ds = trainer.datasets.get("val")
        if not trainer.is_main or not self.interval or not self.num_images or ds is None:
            return
        n = min(self.num_images, len(ds))
        self.samples = [ds[i] for i in range(n)]
        self.names = [f"val_{i:04d}" for i in range(n)]
        self.transform = getattr(getattr(ds, "dataset", ds), "transform", None)

    def _due(self) -> bool:
        t = self.trainer
        max_iters = t.cfg.schedule.max_iters
        last = t.epoch >= t.total_epochs or bool(max_iters and t.iteration >= max_iters)
        return bool(self.samples) and t.iteration != self._drawn and (last or t.epoch % self.interval == 0)

    def after_epoch(self) -> None:
        if not self.trainer.is_main or not self._due():
            return
        self._drawn = self.trainer.iteration
        rng = capture_rng_state()
        try:
            self.draw()
        except Exception as e:  # noqa: BLE001 - a picture never stops training
            if not self._warned:
                logger.warning("routing maps: not drawn after epoch %d (%s: %s); training goes on",
                               self.trainer.epoch, type(e).__name__, e)
                self._warned = True
        finally:
            restore_rng_state(rng)

    def draw(self) -> List[Path]:
        """Draw and log the pictures of the current epoch; returns their paths."""
        t = self.trainer
        out = Path(t.work_dir) / "routing_maps" / f"epoch_{t.epoch:04d}"
        written: List[Path] = []
        for off, batch in batches(t.task, self.samples, self.batch_size):
            maps = routing_maps(t.eval_model, batch, forward=lambda m, b: t.task.predict(m, b, t.device))
            if not maps:
                raise ValueError("the model has no routed layer")
            for b in range(len(maps[next(iter(maps))].expert)):
                name = self.names[off + b]
                image = display(self.samples[off + b][0], self.transform)
                path = routing_figure(image, maps, b, out / f"{name}.png", title=f"{name} (epoch {t.epoch})")
                if t.writer is not None:
                    t.writer.write_image(f"routing_maps/{name}", path, t.iteration)
                written.append(path)
        return written
