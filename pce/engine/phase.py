"""One phase of PCE training: :class:`Phase`, which is also the schema of a config's ``phases`` entries.

``build_phases(cfg.phases, cfg.schedule.epochs)`` validates the entries (errors name the key) and places them
on the epoch axis; :class:`pce.engine.phases.PhaseController` applies them to the models.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pce.moe.routers import parameter_free_routers

__all__ = ["Phase", "PhaseError", "build_phases", "resolve_phase_epochs"]


def resolve_phase_epochs(epochs: Sequence[int], total_epochs: int) -> List[int]:
    """Concrete epochs per phase. Entries are >= 0; only the last may be -1 ("the rest of schedule.epochs").
    Raises ValueError when they do not add up to ``total_epochs``."""
    epochs = [int(e) for e in epochs]
    if not epochs:
        return []
    if any(e < -1 for e in epochs) or -1 in epochs[:-1]:
        raise ValueError(f"phase epochs must be >= 0 (only the last phase may use -1 for 'the rest'), got {epochs}")
    if epochs[-1] == -1:
        rest = total_epochs - sum(epochs[:-1])
        if rest < 0:
            raise ValueError(f"the phase epochs {epochs[:-1]} already exceed schedule.epochs={total_epochs}")
        return epochs[:-1] + [rest]
    if sum(epochs) != total_epochs:
        raise ValueError(f"the phase epochs {epochs} add up to {sum(epochs)}, but schedule.epochs is {total_epochs}; "
                         f"make them equal or give the last phase epochs=-1 (the rest)")
    return epochs


class PhaseError(ValueError):
    """A phase entry of a config is invalid: ``key`` (e.g. ``"lr_mult"``) and what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _router_overrides() -> List[Optional[str]]:
    return [None] + parameter_free_routers()


# The type each config key of a phase accepts (None allowed where the default is None).
_TYPES: Dict[str, Tuple[type, ...]] = {"name": (str,), "epochs": (int,), "router_override": (str,),
                                       "router_override_kwargs": (dict,), "keys_trainable": (bool,),
                                       "attention": (bool,), "lr_mult": (float, int), "upcycle": (bool,)}


@dataclass
class Phase:
    """One training phase, and the schema of a ``phases`` entry of a config (its fields but ``start_epoch``).

    Attributes:
        name: shown in logs. epochs: length (the last phase may say -1, "the rest").
        router_override: ``None`` (the learned routers) or a parameter-free registered router
            (``"uniform"``: weights ``1/E``, but with the learned router's ``top_k`` (top-1: one random expert per
            patch); ``"all_experts"``: every expert on every patch, weights ``1/E`` (``reduce="sum"``: ``1``);
            ``"positional"``, ``"shared"``; see ``pce.moe.routers.parameter_free_routers``).
        router_override_kwargs: arguments of the override router, e.g. ``dict(reduce="sum")`` for
            ``"all_experts"`` (every expert on every patch, summed instead of averaged); ``None``: its defaults.
        keys_trainable / attention: ``None`` leaves the setting as it is.
        lr_mult: multiplier of the base learning rate. upcycle: copy expert 0 into the others at the start.
        start_epoch: set by :func:`build_phases`, not a config key.
    """

    name: str = ""
    epochs: int = 1
    router_override: Optional[str] = None
    router_override_kwargs: Optional[Dict[str, Any]] = None
    keys_trainable: Optional[bool] = None
    attention: Optional[bool] = None
    lr_mult: float = 1.0
    upcycle: bool = False
    start_epoch: int = 0

    @classmethod
    def config_keys(cls) -> List[str]:
        return [f.name for f in fields(cls) if f.name != "start_epoch"]

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], index: int = 0) -> "Phase":
        """Validate one config entry (``PhaseError`` naming the key); missing keys take the defaults."""
        unknown = sorted(set(entry) - set(cls.config_keys()))
        if unknown:
            raise PhaseError(unknown[0], f"unknown phase key; valid phase keys: {', '.join(sorted(cls.config_keys()))}")
        values = {f.name: f.default for f in fields(cls) if f.name != "start_epoch"}
        values.update(entry)
        for key, types in _TYPES.items():
            v = values[key]
            nullable = getattr(cls, key) is None
            if (v is None and nullable) or (isinstance(v, types) and not (isinstance(v, bool) and bool not in types)):
                continue
            expected = " or ".join(t.__name__ for t in types) + (" or None" if nullable else "")
            raise PhaseError(key, f"expects {expected}, got {type(v).__name__} {v!r}")
        if values["router_override"] not in _router_overrides():
            raise PhaseError("router_override", f"must be one of {_router_overrides()}, got {values['router_override']!r}")
        _check_override_kwargs(values["router_override"], values["router_override_kwargs"])
        if values["router_override_kwargs"] is not None:  # a plain dict (checkpoints load with weights_only=True)
            values["router_override_kwargs"] = dict(values["router_override_kwargs"])
        if values["lr_mult"] < 0:
            raise PhaseError("lr_mult", f"must be >= 0, got {values['lr_mult']}")
        values["lr_mult"] = float(values["lr_mult"])
        values["name"] = values["name"] or f"phase{index}"
        return cls(**values)

    def to_config(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.config_keys()}

    @property
    def end_epoch(self) -> int:
        return self.start_epoch + self.epochs

    @property
    def uses_learned_routers(self) -> bool:
        return self.router_override is None

    def describe(self) -> str:
        def show(v: Optional[bool]) -> str:
            return "unchanged" if v is None else str(v)

        kwargs = self.router_override_kwargs
        router = (self.router_override or "learned") + (f"{dict(kwargs)}" if kwargs else "")
        return (f"router={router}, keys_trainable={show(self.keys_trainable)}, "
                f"attention={show(self.attention)}, lr_mult={self.lr_mult:g}"
                + (", experts upcycled from expert 0" if self.upcycle else ""))


def _check_override_kwargs(name: Optional[str], kwargs: Optional[Mapping[str, Any]]) -> None:
    """``router_override_kwargs`` need an override that accepts them (``PhaseError`` naming the key)."""
    if kwargs is None:
        return
    if name is None:
        raise PhaseError("router_override_kwargs", "given without a router_override (the learned routers take no "
                         "phase arguments)")
    from pce.registry import ROUTERS

    try:
        ROUTERS.get(name)(in_channels=None, num_experts=2, **dict(kwargs))
    except (TypeError, ValueError) as e:
        raise PhaseError("router_override_kwargs", f"not valid for router_override={name!r}: {e}") from None


def build_phases(phases: Sequence[Mapping[str, Any]], total_epochs: int) -> List[Phase]:
    """Phases from config dicts (``phases`` of the config). No entries: one phase that changes nothing."""
    if not phases:
        return [Phase("train", total_epochs)]
    parsed = [Phase.from_config(p, i) for i, p in enumerate(phases)]
    epochs = resolve_phase_epochs([p.epochs for p in parsed], total_epochs)
    start = 0
    for p, e in zip(parsed, epochs):
        p.epochs, p.start_epoch = e, start
        start += e
    return parsed
