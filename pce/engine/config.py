"""Python config files with mmdetection-style inheritance, validated against the schema in
:mod:`pce.engine.defaults` and returned as an fvcore / yacs ``CfgNode``.

A config is a ``.py`` file; its public top-level names (dicts, lists, tuples, strings, numbers, bools,
``None``) form the config. Imported modules, functions and names starting with ``_`` are ignored, except::

    _base_ = ["../_base_/models/pce_fmnist.py", "../_base_/default_runtime.py"]   # or one string

Base paths are relative to the file. Bases are merged in order, then the file itself: a child dict merges
key by key into the base dict, any other value replaces the base value, and a child dict holding
``_delete_=True`` replaces the base dict entirely. ``.yaml`` files work the same way (``_base_`` key).

``load_config(path, overrides)`` then applies command-line overrides (``["optimizer.lr=0.01",
"phases.0.epochs=2"]``, values typed with ``literal_eval`` like yacs' ``merge_from_list``; list entries are
addressed by index) and validates everything against the schema with yacs' type rules: an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key and the file (or ``--cfg-options``) that
set it. ``dump_config`` writes the merged config as ``.py`` or ``.yaml``; both reload with ``load_config``.
"""
from __future__ import annotations

import copy
import os
import pprint
import runpy
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import yaml
from fvcore.common.config import CfgNode
from yacs.config import _VALID_TYPES, _check_and_coerce_cfg_value_type

from pce.engine.defaults import CHOICES, get_default_config

__all__ = ["ConfigError", "load_config", "load_raw_config", "parse_overrides", "dump_config", "format_config",
           "config_to_dict", "to_plain", "OVERRIDE_SOURCE"]

OVERRIDE_SOURCE = "--cfg-options"
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))
Overrides = Union[None, Sequence[Union[str, Tuple[str, Any]]], Mapping[str, Any]]


class ConfigError(ValueError):
    """A config problem; the message names the key and the file that set it."""


# ------------------------------------------------------------------------------------------ reading
def _read_file(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".py":
        try:
            ns = runpy.run_path(str(path), run_name="__pce_config__")
        except Exception as e:
            raise ConfigError(f"error while executing config file {path}: {type(e).__name__}: {e}") from e
        out = {}
        for k, v in ns.items():
            if k == "_base_" or (not k.startswith("_") and isinstance(v, _PLAIN)):
                out[k] = v
        return out
    if path.suffix in (".yaml", ".yml"):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a YAML config must be a mapping, got {type(data).__name__}")
        return data
    raise ConfigError(f"unsupported config file type {path.suffix!r} ({path}); use .py or .yaml")


def _drop_origins(origins: Dict[str, str], key: str) -> None:
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]


def _merge(base: Dict[str, Any], child: Mapping[str, Any], origins: Dict[str, str],
           src: Union[str, Mapping[str, str]], prefix: str = "") -> None:
    """Merge ``child`` into ``base`` in place, recording in ``origins`` the file that set each key. ``src`` is
    that file, or the origins map of an already merged base tree."""
    for k, v in child.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key {prefix}{k!r} (set in {src}) must be a string")
        key = prefix + k
        where = src if isinstance(src, str) else _origin(src, key)
        if isinstance(v, dict):
            v = dict(v)
            delete = bool(v.pop("_delete_", False))
            if delete or not isinstance(base.get(k), dict):
                _drop_origins(origins, key)
                base[k] = {}
            origins.setdefault(key, where)
            _merge(base[k], v, origins, src, key + ".")
        else:
            _drop_origins(origins, key)
            base[k] = copy.deepcopy(v)
            origins[key] = where


def _load_tree(path: Path, stack: Tuple[Path, ...]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise ConfigError(f"circular _base_ inheritance: {chain}")
    data = _read_file(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    if not isinstance(bases, (list, tuple)):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {type(bases).__name__}")
    merged: Dict[str, Any] = {}
    origins: Dict[str, str] = {}
    for b in bases:
        bpath = (path.parent / b)
        if not bpath.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {b!r} (resolved to {bpath.resolve()})")
        bdata, borigins = _load_tree(bpath, stack + (path,))
        _merge(merged, bdata, origins, borigins)
    _merge(merged, data, origins, str(path))
    return merged, origins


def _origin(origins: Mapping[str, str], key: str) -> str:
    """The file that set ``key`` (or its closest parent)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:i]))
        if src is not None:
            return src
    return "the schema defaults"


def load_raw_config(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The merged (not yet validated) config dict of ``path`` and the origin file of every key."""
    return _load_tree(Path(path), ())


# -------------------------------------------------------------------------------------- overrides
def parse_overrides(overrides: Overrides) -> List[Tuple[str, Any]]:
    """Command-line style overrides -> ``[(key, value)]``.

    Accepts ``["a.b=1", "c=foo"]`` (values decoded with ``literal_eval``, falling back to the string itself, as
    yacs' ``merge_from_list`` does), yacs-style ``["a.b", "1", "c", "foo"]``, ``(key, value)`` tuples and
    mappings ``{"a.b": value}`` (tuples and mappings carry typed values and are not decoded)."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    items = list(overrides)
    strings = [s for s in items if isinstance(s, str)]
    if len(strings) == len(items) and len(items) % 2 == 0 and all("=" not in s for s in items):
        return [(k, CfgNode._decode_cfg_value(v)) for k, v in zip(items[::2], items[1::2])]
    out = []
    for s in items:
        if isinstance(s, tuple) and len(s) == 2:
            out.append((str(s[0]), s[1]))
            continue
        key, sep, raw = str(s).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{OVERRIDE_SOURCE}: expected KEY=VALUE, got {s!r}")
        out.append((key.strip(), CfgNode._decode_cfg_value(raw.strip())))
    return out


def _default_at(path: List[str]) -> Any:
    node: Any = get_default_config()
    for p in path:
        if isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return None
    return node


def _apply_override(merged: Dict[str, Any], origins: Dict[str, str], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = merged
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        so_far = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not p.lstrip("-").isdigit():
                raise ConfigError(f"{OVERRIDE_SOURCE}: {so_far!r}: {'.'.join(parts[:i])!r} is a list, "
                                  f"index it with a number")
            idx = int(p)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"{OVERRIDE_SOURCE}: {so_far!r}: index {idx} out of range for a list of "
                                  f"{len(node)} entries")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{OVERRIDE_SOURCE}: cannot set {key!r}: {'.'.join(parts[:i])!r} is a value, "
                              f"not a section")
        if last:
            if isinstance(value, dict):
                _merge(node, {p: value}, origins, OVERRIDE_SOURCE, ".".join(parts[:i]) + "." if i else "")
            else:
                node[p] = value
            break
        if p not in node:
            default = _default_at(parts[: i + 1])
            node[p] = copy.deepcopy(default) if isinstance(default, list) else {}
        node = node[p]
    _drop_origins(origins, key)
    origins[key] = OVERRIDE_SOURCE


# -------------------------------------------------------------------------------------- validation
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
        src = _origin(origins, key)
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
            raise ConfigError(f"config key '{key}' (set in {_origin(origins, key)}) must be one of "
                              f"{list(allowed)}, got {node!r}")


def _check_phases(cfg: CfgNode, origins: Mapping[str, str]) -> None:
    """Each ``phases`` entry validated by its one definition, :class:`pce.engine.phases.Phase`."""
    from pce.engine.phases import Phase, PhaseError, resolve_phase_epochs  # local: phases imports torch

    out = []
    for i, ph in enumerate(cfg.phases):
        key = f"phases.{i}"
        src = _origin(origins, key)
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
        srcs = sorted({_origin(origins, "phases"), _origin(origins, "schedule.epochs")})
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
            raise ConfigError(f"config key '{key}' (set in {_origin(origins, key)}) must be "
                              f"{'> 0' if key in positive else '>= 0'}, got {v!r}")
    if not 0.0 <= cfg.runtime.ema < 1.0:
        raise ConfigError(f"config key 'runtime.ema' (set in {_origin(origins, 'runtime.ema')}) must be in [0, 1), "
                          f"got {cfg.runtime.ema}")


def build_config(merged: Mapping[str, Any], origins: Mapping[str, str]) -> CfgNode:
    """Validate a merged dict against the schema; returns a new (unfrozen) CfgNode."""
    cfg = get_default_config()
    _validate_into(cfg, merged, origins)
    _check_choices(cfg, origins)
    _check_values(cfg, origins)
    _check_phases(cfg, origins)
    return cfg


def load_config(path: Union[str, os.PathLike], overrides: Overrides = None, freeze: bool = True) -> CfgNode:
    """Read ``path`` (with its ``_base_`` chain), apply ``overrides`` and validate. See the module docstring.

    ``runtime.work_dir`` defaults to ``work_dirs/<file stem>``. Returns a frozen CfgNode (``freeze=False``:
    mutable)."""
    merged, origins = load_raw_config(path)
    for key, value in parse_overrides(overrides):
        _apply_override(merged, origins, key, value)
    cfg = build_config(merged, origins)
    if not cfg.runtime.work_dir:
        cfg.runtime.work_dir = os.path.join("work_dirs", Path(path).stem)
    if freeze:
        cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------------------- writing
def config_to_dict(cfg: Any) -> Any:
    """CfgNode -> plain nested dicts (lists / tuples kept)."""
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, tuple):
        return tuple(config_to_dict(v) for v in cfg)
    return cfg


def to_plain(x: Any) -> Any:
    """Mappings (CfgNode included) and tuples -> dicts and lists, recursively (YAML- and kwargs-ready)."""
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


def format_config(cfg: CfgNode) -> str:
    """The config as Python source that :func:`load_config` reads back."""
    d = config_to_dict(cfg)
    lines = ["# merged PCE config (generated); reload with pce.engine.load_config", ""]
    for k, v in d.items():
        lines.append(f"{k} = {pprint.pformat(v, indent=1, width=110, sort_dicts=False)}")
        lines.append("")
    return "\n".join(lines)


def dump_config(cfg: CfgNode, path: Union[str, os.PathLike]) -> Path:
    """Write the merged config to ``path`` (``.py`` or ``.yaml``), atomically. Returns the path."""
    path = Path(path)
    if path.suffix == ".py":
        text = format_config(cfg)
    elif path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(to_plain(config_to_dict(cfg)), sort_keys=False)
    else:
        raise ConfigError(f"dump_config: unsupported file type {path.suffix!r}; use .py or .yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
