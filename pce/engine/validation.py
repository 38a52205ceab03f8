"""Validation of a merged config against the schema (:mod:`pce.engine.defaults`) with yacs' type rules:
unknown keys, wrong types, allowed choices, value ranges and the phases (:class:`pce.engine.phase.Phase`).
Every error is a :class:`ConfigError` naming the key and the file (or ``--cfg-options``) that set it."""
from __future__ import annotations

import copy
from typing import Any, Mapping

from fvcore.common.config import CfgNode
from yacs.config import _VALID_TYPES, _check_and_coerce_cfg_value_type

from pce.engine.defaults import CHOICES, get_default_config

__all__ = ["ConfigError", "build_config", "key_origin"]


class ConfigError(ValueError):
    """A config problem; the message names the key and the file that set it."""


# ------------------------------------------------------------------------------------------ reading
def key_origin(origins: Mapping[str, str], key: str) -> str:
    """The file that set ``key`` (or its closest parent)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:i]))
        if src is not None:
            return src
    return "the schema defaults"


def _coerce(value: Any, default: Any, key: str, src: str) -> Any:
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if isinstance(value, list) and isinstance(default, (list, tuple)) and default and isinstance(default[0], float):
        value = [float(v) if type(v) is int else v for v in value]
    try:
        return _check_and_coerce_cfg_value_type(value, default, key.rsplit(".", 1)[-1], key)
    except ValueError:
        raise ConfigError(f"config key '{key}' (set in {src}) expects {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}") from None


def _to_node(value: Any, key: str, src: str, in_list: bool = False) -> Any:
    """A free-form value under a ``new_allowed`` node: dicts become open CfgNodes (plain dicts inside lists),
    tuples become lists (as YAML gives them, so .py and .yaml dumps reload the same)."""
    if isinstance(value, dict):
        items = {k: _to_node(v, f"{key}.{k}", src, in_list) for k, v in value.items()}
        if in_list:
            return items
        node = CfgNode(new_allowed=True)
        for k, v in items.items():
            node[k] = v
        return node
    if isinstance(value, (list, tuple)):
        return [_to_node(v, f"{key}.{i}", src, True) for i, v in enumerate(value)]
    if type(value) not in _VALID_TYPES:
        raise ConfigError(f"config key '{key}' (set in {src}): {type(value).__name__} is not a valid config "
                          f"value; use dicts, lists, tuples, str, int, float, bool or None")
    return copy.deepcopy(value)


def _validate_into(node: CfgNode, data: Mapping[str, Any], origins: Mapping[str, str], prefix: str = "") -> None:
    for k, v in data.items():
        key = prefix + k
        src = key_origin(origins, key)
        if k not in node:
            if node.is_new_allowed():
                node[k] = _to_node(v, key, src)
                continue
            section = prefix[:-1] or "the top level"
            raise ConfigError(f"unknown config key '{key}' (set in {src}); valid keys in {section}: "
                              f"{', '.join(sorted(node))}")
        cur = node[k]
        if isinstance(cur, CfgNode):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' (set in {src}) is a section: expects a dict, got "
                                  f"{type(v).__name__} {v!r}")
            _validate_into(cur, v, origins, key + ".")
        elif isinstance(v, dict):
            raise ConfigError(f"config key '{key}' (set in {src}) expects {type(cur).__name__} "
                              f"(default {cur!r}), got a dict")
        else:
            node[k] = _coerce(v, cur, key, src)


def _check_choices(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    for key, allowed in CHOICES.items():
        node: Any = cfg
        for p in key.split("."):
            node = node[p]
        if node not in allowed:
            raise ConfigError(f"config key '{key}' (set in {key_origin(origins, key)}) must be one of "
                              f"{list(allowed)}, got {node!r}")


def _check_phases(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    """Each ``phases`` entry validated by its one definition, :class:`pce.engine.phase.Phase`."""
    from pce.engine.phase import Phase, PhaseError, resolve_phase_epochs

    out = []
    for i, ph in enumerate(cfg.phases):
        key = f"phases.{i}"
        src = key_origin(origins, key)
        if isinstance(ph, CfgNode):
            ph = dict(ph)
        if not isinstance(ph, dict):
            raise ConfigError(f"config key '{key}' (set in {src}) must be a dict with keys "
                              f"{sorted(Phase.config_keys())}, got {type(ph).__name__} {ph!r}")
        try:
            out.append(Phase.from_config(ph, i).to_config())
        except PhaseError as e:
            what = "unknown config key" if str(e).startswith("unknown") else "config key"
            raise ConfigError(f"{what} '{key}.{e.key}' (set in {src}) {e}") from None
    try:
        resolve_phase_epochs([p["epochs"] for p in out], cfg.schedule.epochs)
    except ValueError as e:
        srcs = sorted({key_origin(origins, "phases"), key_origin(origins, "schedule.epochs")})
        raise ConfigError(f"config keys 'phases' / 'schedule.epochs' (set in {', '.join(srcs)}): {e}") from None
    cfg.phases = out


def _check_values(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    positive = ["schedule.epochs", "data.batch_size", "runtime.log_interval"]
    non_negative = ["schedule.iters_per_epoch", "schedule.max_iters", "data.num_workers", "data.eval_batch_size",
                    "runtime.eval_interval", "runtime.checkpoint_interval", "runtime.kmeans_init_batches",
                    "runtime.num_threads",
                    "optimizer.lr", "optimizer.weight_decay", "optimizer.grad_clip",
                    "schedule.lr_scheduler.warmup_epochs"]
    for key in positive + non_negative:
        sec, _, name = key.rpartition(".")
        node: Any = cfg
        for p in sec.split("."):
            node = node[p]
        v = node[name]
        if (key in positive and v <= 0) or v < 0:
            raise ConfigError(f"config key '{key}' (set in {key_origin(origins, key)}) must be "
                              f"{'> 0' if key in positive else '>= 0'}, got {v!r}")
    if not 0.0 <= cfg.runtime.ema < 1.0:
        raise ConfigError(f"config key 'runtime.ema' (set in {key_origin(origins, 'runtime.ema')}) must be in [0, 1), "
                          f"got {cfg.runtime.ema}")


def build_config(merged: Mapping[str, Any], origins: Mapping[str, str]) -> CfgNode:
    """Validate a merged dict against the schema; returns a new (unfrozen) CfgNode."""
    cfg = get_default_config()
    _validate_into(cfg, merged, origins)
    _check_choices(cfg, origins)
    _check_values(cfg, origins)
    _check_phases(cfg, origins)
    return cfg
