"""Validation of a merged config against the schema (:mod:`pce.engine.defaults`) with yacs' type rules:
unknown keys, wrong types, allowed choices, value ranges, the phases (:class:`pce.engine.phase.Phase`) and the
``model.convert`` entries (:func:`convert_options`, :func:`convert_call`).
Every error is a :class:`ConfigError` naming the key and the file (or ``--cfg-options``) that set it."""
from __future__ import annotations

import copy
import difflib
import inspect
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from fvcore.common.config import CfgNode
from yacs.config import _VALID_TYPES, _check_and_coerce_cfg_value_type

from pce.engine.defaults import CHOICES, get_default_config

__all__ = ["ConfigError", "build_config", "key_origin", "convert_options", "convert_call"]


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
    positive = ["schedule.epochs", "data.batch_size", "runtime.log_interval", "optimizer.accumulate_steps"]
    non_negative = ["optimizer.auto_scale_lr.base_batch_size", "schedule.iters_per_epoch", "schedule.max_iters", "data.num_workers", "data.eval_batch_size",
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


# ------------------------------------------------------------------------------------- model.convert
def _convert_signatures() -> Tuple[List[str], List[str]]:
    """``(options of PCEConv2d.from_conv, the other keyword options of PCEConv2d)``, read from the signatures."""
    from pce.models.pce_conv import PCEConv2d

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    upcycle = [n for n, p in inspect.signature(PCEConv2d.from_conv).parameters.items()
               if p.kind in kinds and n not in ("conv", "layer_options")]
    layer = [n for n, p in inspect.signature(PCEConv2d.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in upcycle and n not in ("device", "dtype")]
    return upcycle, layer


def convert_options() -> Tuple[str, ...]:
    """The keys of one ``model.convert`` entry: ``target`` (a module path of the built model, a glob, or a list of
    them: :func:`pce.convert`'s targets) and the options of :class:`pce.PCEConv2d` as
    :meth:`~pce.PCEConv2d.from_conv` takes them (``num_experts``, ``top_k``, ``grid``, ``router``, ``noise``,
    ``execution``, ``patch_size``, ``router_kwargs``, ``balance``, ``dispatch``, ...), read from its signatures, so
    an option PCEConv2d gains is valid here at once."""
    upcycle, layer = _convert_signatures()
    return ("target",) + tuple(upcycle) + tuple(layer)


def convert_call(entry: Mapping[str, Any]) -> Tuple[List[str], Dict[str, Any]]:
    """``(targets, keyword arguments of pce.convert)`` of one validated ``model.convert`` entry: ``router_kwargs``
    spread as the router's keyword arguments, the constructor-only options (``balance``, ``dispatch``, ...) in
    ``layer_options``, lists (``grid``) as tuples."""
    upcycle, _ = _convert_signatures()
    target = entry["target"]
    targets = [target] if isinstance(target, str) else list(target)
    kwargs: Dict[str, Any] = {}
    layer: Dict[str, Any] = {}
    for k, v in entry.items():
        v = tuple(v) if isinstance(v, list) else copy.deepcopy(v)
        if k == "target":
            continue
        if k == "router_kwargs":
            kwargs.update(v or {})
        elif k in upcycle:
            kwargs[k] = v
        else:
            layer[k] = v
    if layer:
        kwargs["layer_options"] = layer
    return targets, kwargs


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _entry_with_target(entry: Any, key: str, src: str, valid: Sequence[str]) -> Dict[str, Any]:
    """A ``model.convert`` / ``model.condconv`` entry as a plain dict whose keys are in ``valid`` and whose
    ``target`` is a module path / glob or a list of them; :class:`ConfigError` naming ``<key>.<option>``."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"config key '{key}' (set in {src}) must be a dict with keys {list(valid)}, got "
                          f"{type(entry).__name__} {entry!r}")
    entry = _plain(entry)
    for k in entry:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            raise ConfigError(f"unknown config key '{key}.{k}' (set in {src}); "
                              + (f"did you mean '{close[0]}'? " if close else "")
                              + f"valid keys in {key}: {', '.join(valid)}")
    target = entry.get("target")
    names = [target] if isinstance(target, str) else target
    if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(f"config key '{key}.target' (set in {src}) must be a module path or glob of the built "
                          f"model (e.g. 'net.segmentation_head.0', 'backbone.stages.2.*') or a list of them, got "
                          f"{target!r}")
    return entry


def _check_convert_entry(entry: Any, key: str, src: str) -> Dict[str, Any]:
    """One ``model.convert`` entry as a plain dict; :class:`ConfigError` naming ``model.convert.<i>.<option>``."""
    import torch
    from torch import nn

    from pce.engine.errors import one_line
    from pce.models.pce_conv import PCEConv2d

    valid = convert_options()
    entry = _entry_with_target(entry, key, src, valid)
    rkw = entry.get("router_kwargs", {})
    if not isinstance(rkw, dict):
        raise ConfigError(f"config key '{key}.router_kwargs' (set in {src}) expects a dict of the router's keyword "
                          f"arguments, got {type(rkw).__name__} {rkw!r}")
    for k in rkw:
        if k in valid:
            raise ConfigError(f"config key '{key}.router_kwargs.{k}' (set in {src}): {k} is an option of the entry; "
                              f"set '{key}.{k}' instead")
    _, kwargs = convert_call(entry)
    try:  # the values, checked by the one definition: a PCEConv2d built from a small convolution (RNG untouched)
        with torch.random.fork_rng(devices=[]):
            PCEConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        msg = one_line(e)
        culprit = next((k for k in list(entry) + [f"router_kwargs.{r}" for r in rkw]
                        if k != "target" and k.rpartition(".")[2] in msg), None)
        raise ConfigError(f"config key '{key}{'.' + culprit if culprit else ''}' (set in {src}): {msg}") from None
    return entry


def _check_convert(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    """Each ``model.convert`` entry checked (:func:`_check_convert_entry`) and stored as plain data."""
    cfg.model.convert = [_check_convert_entry(e, f"model.convert.{i}", key_origin(origins, f"model.convert.{i}"))
                         for i, e in enumerate(cfg.model.convert)]


def _check_condconv(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    """Each ``model.condconv`` entry: a dict of :func:`pce.models.condconv.condconv_options` with a ``target``
    (module path, glob or list of them) and an integer ``num_experts >= 1``; stored as plain data."""
    from pce.models.condconv import condconv_options

    valid = condconv_options()
    out = []
    for i, entry in enumerate(cfg.model.condconv):
        key, src = f"model.condconv.{i}", key_origin(origins, f"model.condconv.{i}")
        entry = _entry_with_target(entry, key, src, valid)
        n = entry.get("num_experts", 4)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"config key '{key}.num_experts' (set in {src}) must be an integer >= 1, got {n!r}")
        std = entry.get("init_std", 0.01)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
            raise ConfigError(f"config key '{key}.init_std' (set in {src}) must be a number >= 0 (the routing "
                              f"layer's initial weight std), got {std!r}")
        out.append(entry)
    cfg.model.condconv = out


def build_config(merged: Mapping[str, Any], origins: Mapping[str, str]) -> CfgNode:
    """Validate a merged dict against the schema; returns a new (unfrozen) CfgNode."""
    cfg = get_default_config()
    _validate_into(cfg, merged, origins)
    _check_choices(cfg, origins)
    _check_values(cfg, origins)
    _check_phases(cfg, origins)
    _check_convert(cfg, origins)
    _check_condconv(cfg, origins)
    return cfg
