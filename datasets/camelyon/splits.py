"""The validation split carved from a layout's training slides (by slide, stratified tumour / normal, seeded, or a
listed holdout: :func:`holdout_split`) and the split records a run writes (:func:`write_split_records`:
``<work dir>/camelyon_split.json``, checked for train / val overlap)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .layout_table import SlideEntry, under_root

__all__ = ["holdout_split", "write_split_records", "SPLIT_FILE", "NAMED_SPLITS"]

SPLIT_FILE = "camelyon_split.json"
NAMED_SPLITS = ("training", "train", "val", "test")


def _read_holdout_list(spec: Union[str, os.PathLike], root: Path) -> List[str]:
    """Validation slide stems from a ``.txt`` list (one stem or path per line) or a ``.json`` split record
    (``camelyon_split.json`` of a run: its ``val`` slides)."""
    p = under_root(root, spec)
    if not p.is_file():
        raise FileNotFoundError(f"{spec}: holdout list not found (a .txt of slide stems, or a run's {SPLIT_FILE}; "
                                f"relative paths are tried from the working directory, then from {root})")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: not a readable JSON split record ({e})") from None
        val = data.get("val") if isinstance(data, dict) else None
        if isinstance(val, dict):
            val = val.get("slides")
        if not isinstance(val, list):
            raise ValueError(f"{p}: no 'val' slide list (expected a {SPLIT_FILE} written by a training run)")
        return [Path(str(v)).stem for v in val]
    return [Path(ln.strip()).stem for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def holdout_split(entries: Sequence[SlideEntry], holdout: Union[None, float, str, os.PathLike], seed: int = 0,
                  root: Optional[Path] = None) -> Tuple[List[SlideEntry], List[SlideEntry]]:
    """``(train, val)`` of the training slides ``entries``, by slide.

    ``holdout`` a fraction ``f``: in each stratum (tumour, normal) ``round(f * n)`` slides, at most ``n - 1``,
    drawn with ``numpy.random.default_rng([seed, stratum])`` from the slides sorted by stem (so the split depends
    on the slide names, ``f`` and ``seed`` only, not on the listing order); when that holds out nothing and there
    are two slides or more, one slide of the largest stratum (ties: normal). A path: a ``.txt`` list of validation
    slide stems or a run's ``camelyon_split.json``. None or 0: no validation slide."""
    entries = sorted(entries, key=lambda e: e.stem)
    if holdout is None or (not isinstance(holdout, (str, os.PathLike)) and float(holdout) == 0.0):
        return list(entries), []
    if isinstance(holdout, (str, os.PathLike)):
        stems = _read_holdout_list(holdout, root or Path("."))
        known = {e.stem.lower() for e in entries}
        unknown = [s for s in stems if s.lower() not in known]
        if unknown:
            raise ValueError(f"{holdout}: {len(unknown)} validation slide(s) are not training slides of this layout "
                             f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})")
        chosen = {s.lower() for s in stems}
    else:
        f = float(holdout)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"holdout={holdout} (expected a fraction in [0, 1) of the training slides, or a "
                             f"slide list)")
        strata = {k: [e for e in entries if bool(e.tumour) == k] for k in (True, False)}
        chosen = set()
        take = {k: min(int(math.floor(f * len(v) + 0.5)), max(len(v) - 1, 0)) for k, v in strata.items()}
        if f > 0 and not sum(take.values()) and len(entries) >= 2:
            take[max(strata, key=lambda k: (len(strata[k]), not k))] = 1  # the largest stratum (ties: normal)
        for k, v in strata.items():
            rng = np.random.default_rng([int(seed), int(k)])
            chosen |= {v[i].stem.lower() for i in rng.permutation(len(v))[: take[k]]}
    return ([e for e in entries if e.stem.lower() not in chosen], [e for e in entries if e.stem.lower() in chosen])



def write_split_records(work_dir: Union[str, os.PathLike], datasets: Mapping[str, Any]) -> List[Path]:
    """Write the ``split_record`` of every dataset that has one to ``work_dir/<its split_record_file>``
    (``camelyon_split.json``: ``{"train": record, "val": record, ...}``), atomically; returns the files written.

    ``ValueError`` when the splits disagree: a slide both in a training and in a validation split, or train and
    val holding out different slides (different ``seed`` / ``holdout``: they would overlap)."""
    files: Dict[str, Dict[str, Any]] = {}
    for name, ds in datasets.items():
        rec = getattr(ds, "split_record", None)
        if isinstance(rec, dict):
            files.setdefault(getattr(ds, "split_record_file", SPLIT_FILE), {})[str(name)] = rec
    out = []
    for fname, recs in files.items():
        _check_records(recs)
        path = Path(work_dir) / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(recs, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        out.append(path)
    return out


def _check_records(recs: Mapping[str, Mapping[str, Any]]) -> None:
    holdouts = {n: (tuple(r["train"]), tuple(r["val"])) for n, r in recs.items() if "val" in r and "train" in r}
    if len(set(holdouts.values())) > 1:
        a, b = list(holdouts)[:2]
        raise ValueError(f"data.{a} and data.{b} hold out different validation slides (their seed / holdout / layout "
                         f"differ: {recs[a].get('seed')}/{recs[a].get('holdout')} against "
                         f"{recs[b].get('seed')}/{recs[b].get('holdout')}), so they would share slides; give both "
                         f"the same seed and holdout")
    train = {s for n, r in recs.items() if r.get("split") in ("train", "training") for s in r.get("slides", [])}
    for n, r in recs.items():
        if r.get("split") in ("val", "test"):
            shared = sorted(train & set(r.get("slides", [])))
            if shared:
                raise ValueError(f"data.{n} ({r['split']}) shares {len(shared)} slide(s) with the training split "
                                 f"({', '.join(shared[:5])})")

