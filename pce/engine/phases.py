"""Phased PCE training: the phase controller (the phases: :mod:`pce.engine.phase`; their learning rates:
:mod:`pce.engine.scheduler`).

A PCE run is a list of phases (config ``phases``), each a number of epochs with its own settings:

* ``router_override``: ``"uniform"`` / ``"positional"`` / ``"shared"`` / ``"all_experts"`` route every
  routed layer (a PCE backbone's layers, a :class:`pce.PCEConv2d` put into any model by ``model.convert``) with a
  parameter-free router (stabilisation: the experts learn before the routers decide anything); ``None`` uses the
  learned routers. ``"uniform"`` inherits the learned router's ``top_k`` (top-1: one random expert per patch);
  ``"all_experts"`` runs every expert on every patch, weights ``1/E`` (``router_override_kwargs=dict(reduce="sum")``:
  ``1``); context-execution layers run map execution meanwhile (:meth:`PhaseController.fit_executions`).
* ``keys_trainable``: keyed routers' keys (``Router.uses_keys``) outside the graph (EMA-updated) or trained
  by the optimizer.
* ``attention``: deformable attention blocks on or off.
* ``lr_mult``: multiplier of the base learning rate during the phase (applied by
  :class:`pce.engine.scheduler.PCEScheduler`).
* ``upcycle``: when the phase starts, copy expert 0 into every other expert (sparse upcycling after a
  ``router_override="shared"`` phase that trained expert 0 on every patch). Runs once, before the K-Means
  initialisation, and not again when a run resumes inside the phase.

``None`` for ``keys_trainable`` / ``attention`` leaves the setting as it is. The K-Means initialisation of the
router keys (:func:`pce.models.backbone.init_router_keys`) runs once, right before the first phase that uses the
learned routers.

Every setting reaches the model through the walkers of :mod:`pce.models.routed` (``routed_layers``,
``key_routers``, ``set_router_override``, ...), so a model with routed layers and no :class:`PCEBackbone` (a
converted smp / timm model, a dense twin with ``model.convert``) is driven exactly like a PCE backbone.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from pce.engine.phase import Phase
from pce.models.backbone import PCEBackbone, init_router_keys, iter_backbones
from pce.models.routed import (key_routers, routed_layers, set_attention_enabled, set_keys_trainable,
                               set_router_override, upcycle_experts)

__all__ = ["PhaseController", "find_backbones"]

logger = logging.getLogger("pce.engine")


def find_backbones(model: nn.Module) -> List[PCEBackbone]:
    """Every :class:`~pce.models.backbone.PCEBackbone` inside ``model`` (unwrapping DDP / EMA wrappers)."""
    return list(iter_backbones(model))


class PhaseController:
    """Applies the settings of the current phase to the models (the trained one and e.g. its EMA copy).

    ``on_epoch_start(epoch, models, kmeans_batches)`` is called at the start of every epoch (also right after a
    resume, because router overrides are not part of checkpoints); it returns the phase when one starts.
    ``kmeans_batches`` is a callable returning the image batches for the K-Means initialisation; it is called
    only when that initialisation is due. :meth:`state_dict` (the phase index and whether the keys were
    initialised) goes into checkpoints.
    """

    def __init__(self, phases: Sequence[Phase], kmeans_init_batches: int = 8, seed: int = 0) -> None:
        if not phases:
            raise ValueError("PhaseController needs at least one phase")
        self.phases = list(phases)
        self.kmeans_init_batches = int(kmeans_init_batches)
        self.seed = int(seed)
        self.current: Optional[int] = None   # index of the phase whose settings are applied
        self.keys_initialized = False
        self.history: List[Dict[str, Any]] = []

    @property
    def phase_epochs(self) -> List[int]:
        return [p.epochs for p in self.phases]

    @property
    def lr_multipliers(self) -> List[float]:
        return [p.lr_mult for p in self.phases]

    def phase_index(self, epoch: int) -> int:
        for i, p in enumerate(self.phases):
            if p.start_epoch <= epoch < p.end_epoch:
                return i
        return len(self.phases) - 1

    def phase_at(self, epoch: int) -> Phase:
        return self.phases[self.phase_index(epoch)]

    def apply(self, phase: Phase, models: Iterable[nn.Module]) -> bool:
        """Set router override, key trainability and attention on every routed layer of ``models``.
        Returns True when the set of parameters of the first model requiring gradients changed (DDP must be
        rebuilt)."""
        changed = False
        for i, model in enumerate(models):
            if model is None:
                continue
            before = [p.requires_grad for p in model.parameters()] if i == 0 else []
            set_router_override(model, phase.router_override, **dict(phase.router_override_kwargs or {}))
            self.fit_executions(phase, model)
            if phase.keys_trainable is not None:
                set_keys_trainable(model, phase.keys_trainable)
            if phase.attention is not None:
                set_attention_enabled(model, phase.attention)
            if i == 0:
                changed = before != [p.requires_grad for p in model.parameters()]
        return changed

    def fit_executions(self, phase: Phase, model: nn.Module) -> int:
        """Under an override that sends every patch to every expert (``"all_experts"``), a PCE layer
        with ``execution="context"`` (one expert per patch) runs ``"map"`` instead: every expert on the whole map,
        reading across patch borders as context execution does; its own execution is restored when a phase without
        such an override is applied. Returns the number of layers switched; a layer whose options ``"map"`` cannot
        honour (``norm_stats="layer"``) is an error naming ``phases.<i>.router_override``."""
        from pce.engine.errors import PCEError
        from pce.moe.execution import ContextExecution
        from pce.registry import ROUTERS

        name = phase.router_override
        all_experts = name is not None and getattr(ROUTERS.get(name), "all_experts", False)
        switched = 0
        for layer_name, layer in routed_layers(model):
            saved = layer.__dict__.get("_execution_before_phase")
            if all_experts and isinstance(getattr(layer, "strategy", None), ContextExecution):
                try:
                    layer.execution = "map"
                except ValueError as e:
                    raise PCEError(f"phases.{self.phases.index(phase)}.router_override", f"{name!r} runs every "
                                   f"expert on every patch, which layer {layer_name} (execution='context') cannot "
                                   f"run as 'map' execution: {e}", "a learned router, 'uniform' or 'shared' "
                                   "for this layer") from None
                layer.__dict__["_execution_before_phase"] = "context"
                switched += 1
            elif not all_experts and saved is not None:
                layer.execution = saved
                del layer.__dict__["_execution_before_phase"]
        return switched

    def check_effects(self, model: nn.Module) -> None:
        """A phase setting the model cannot honour is an error naming it (``attention=True`` without deformable
        attention blocks); one that changes nothing on this model (key or router settings without routed
        layers) is a warning. Called once, before the first epoch."""
        from pce.engine.errors import PCEError
        from pce.layers.attention import DeformableAttention

        has_attention = any(isinstance(m, DeformableAttention) for m in model.modules())
        has_keys = any(True for _ in key_routers(model))
        has_pce = any(True for _ in routed_layers(model))
        for i, p in enumerate(self.phases):
            if p.attention and not has_attention:
                raise PCEError(f"phases.{i}.attention", f"attention=True in phase '{p.name}' has no effect: the "
                               f"model has no deformable-attention block", "a backbone stage with attention=True, "
                               "or no attention key in the phase")
            unused = [k for k, v in (("keys_trainable", p.keys_trainable if not has_keys else None),
                                     ("router_override", p.router_override if not has_pce else None),
                                     ("upcycle", p.upcycle if not has_pce else None)) if v]
            if unused:
                logger.warning("phases.%d ('%s'): %s has no effect on this model (no %s)", i, p.name,
                               ", ".join(f"{k}={getattr(p, k)!r}" for k in unused),
                               "routed layers" if not has_pce else "key-based routers")

    def needs_kmeans(self, phase: Phase, model: nn.Module) -> bool:
        return (phase.uses_learned_routers and not self.keys_initialized and self.kmeans_init_batches > 0
                and any(True for _ in key_routers(model)))

    def init_keys(self, model: nn.Module, batches: Iterable[torch.Tensor], others: Sequence[nn.Module] = ()) -> int:
        """K-Means initialisation of every key router of ``model``; the keys are copied into ``others``
        (e.g. the EMA model). Returns the number of routers initialised."""
        count = init_router_keys(model, list(batches), seed=self.seed)
        for other in others:
            if other is None:
                continue
            for a, b in zip(key_routers(model), key_routers(other)):
                b.keys.data.copy_(a.keys.data)
        self.keys_initialized = True
        return count

    def on_epoch_start(self, epoch: int, models: Sequence[nn.Module],
                       kmeans_batches: Optional[Callable[[], Iterable[torch.Tensor]]] = None,
                       optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
        """Apply the phase of ``epoch`` (``models[0]`` is the trained model, whose ``optimizer`` state follows an
        upcycling; the others, e.g. the EMA copy, follow the settings). Returns ``{"phase": Phase, "index": int,
        "started": bool, "requires_grad_changed": bool, "kmeans_routers": int, "upcycled_layers": int}``."""
        idx = self.phase_index(epoch)
        phase = self.phases[idx]
        started = idx != self.current
        kmeans = upcycled = 0
        models = [m for m in models if m is not None]
        if not getattr(self, "_effects_checked", False):
            self.check_effects(models[0])
            self._effects_checked = True
        if started and phase.upcycle:
            # every model (the trained one and its EMA copy) copies its own expert 0; report the first's count
            upcycled = [upcycle_experts(m, 0, optimizer if i == 0 else None) for i, m in enumerate(models)][0]
            logger.info("upcycled the experts of %d routed layer(s) from expert 0 before phase '%s'", upcycled,
                        phase.name)
        if self.needs_kmeans(phase, models[0]) and kmeans_batches is not None:
            # the learned routers take over: initialise their keys on real patches first
            for m in models:
                set_router_override(m, phase.router_override)
            kmeans = self.init_keys(models[0], kmeans_batches(), models[1:])
            logger.info("K-Means initialised the keys of %d router(s) before phase '%s'", kmeans, phase.name)
        changed = self.apply(phase, models)
        if started:
            logger.info("epoch %d: phase %d/%d '%s' (epochs %d-%d): %s", epoch + 1, idx + 1, len(self.phases),
                        phase.name, phase.start_epoch + 1, phase.end_epoch, phase.describe())
            if self.current is None or idx > self.current:
                self.history.append({"epoch": epoch, "phase": idx, "name": phase.name})
        self.current = idx
        return {"phase": phase, "index": idx, "started": started, "requires_grad_changed": changed,
                "kmeans_routers": kmeans, "upcycled_layers": upcycled}

    def state_dict(self) -> Dict[str, Any]:
        return {"current": -1 if self.current is None else self.current, "keys_initialized": self.keys_initialized,
                "history": [dict(h) for h in self.history], "phases": [asdict(p) for p in self.phases]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keys_initialized = bool(state.get("keys_initialized", False))
        self.history = [dict(h) for h in state.get("history", [])]
        # the settings are re-applied by the next on_epoch_start; keep `current` so no spurious "phase starts"
        cur = int(state.get("current", -1))
        self.current = None if cur < 0 else cur
