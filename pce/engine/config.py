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
set it. ``dump_config`` writes the merged config as ``.py``, ``.yaml`` or ``.json``; each reloads with
``load_config``.

A ``.json`` config is plain data (a saved, resolved config: no ``_base_``), so reading one never runs code:
:func:`load_saved_config` reads the ``config.json`` a training run writes into its work dir, for the tools that
open a work dir someone else may have written (``--resume``, ``tools/report.py``); they never execute the work
dir's ``config.py``.
"""
from __future__ import annotations

import copy
import json
import os
import pprint
import runpy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import yaml
from fvcore.common.config import CfgNode

from pce.engine.defaults import get_default_config
from pce.engine.validation import ConfigError, build_config, key_origin

__all__ = ["ConfigError", "load_config", "load_saved_config", "load_raw_config", "parse_overrides", "dump_config",
           "format_config", "config_to_dict", "to_plain", "OVERRIDE_SOURCE"]

OVERRIDE_SOURCE = "--cfg-options"
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))
Overrides = Union[None, Sequence[Union[str, Tuple[str, Any]]], Mapping[str, Any]]


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
    if path.suffix == ".json":
        return _read_json(path)
    raise ConfigError(f"unsupported config file type {path.suffix!r} ({path}); use .py, .yaml or .json")


def _read_json(path: Path) -> Dict[str, Any]:
    """A saved config: one JSON object of plain values, no ``_base_`` (nothing is executed or followed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a JSON config must be an object, got {type(data).__name__}")
    if "_base_" in data:
        raise ConfigError(f"{path}: a JSON config is a saved, resolved config and has no _base_")
    return data


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
        where = src if isinstance(src, str) else key_origin(src, key)
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


def load_saved_config(path: Union[str, os.PathLike], overrides: Overrides = None, freeze: bool = True) -> CfgNode:
    """The config a run saved as ``config.json`` (plain data: nothing is executed), validated like
    :func:`load_config` (an unknown key or a wrong type is a :class:`ConfigError` naming the file)."""
    path = Path(path)
    if path.suffix != ".json":
        raise ConfigError(f"{path}: a saved config is read from its .json form only (a .py config is Python: "
                          "pass it on the command line to run it)")
    return load_config(path, overrides, freeze)


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
    """Write the merged config to ``path`` (``.py``, ``.yaml`` or ``.json``), atomically. Returns the path."""
    path = Path(path)
    if path.suffix == ".py":
        text = format_config(cfg)
    elif path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(to_plain(config_to_dict(cfg)), sort_keys=False)
    elif path.suffix == ".json":
        text = json.dumps(to_plain(config_to_dict(cfg)), indent=1) + "\n"
    else:
        raise ConfigError(f"dump_config: unsupported file type {path.suffix!r}; use .py, .yaml or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the temp-file pattern remove_stale_temps knows
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
