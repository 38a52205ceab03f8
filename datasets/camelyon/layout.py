"""The Camelyon folder layouts as datasets: Camelyon16 as the challenge distributed it or as the AWS open-data
registry holds it, Camelyon17's centres / patients / nodes (slide list and labels); a validation split carved from
the training slides (by slide, stratified tumour / normal, seeded) and its record; a balanced sampler.

Layouts (``layout=`` of :class:`Camelyon16Tiles`; ``ROOT`` is ``data.root``):

* ``"challenge"``: ``ROOT/training/tumor/tumor_*.tif``, ``ROOT/training/normal/normal_*.tif``,
  ``ROOT/lesion_annotations/tumor_*.xml``; test: ``ROOT/testing/images/test_*.tif``,
  ``ROOT/testing/lesion_annotations/test_*.xml``.
* ``"aws"``: ``ROOT/CAMELYON16/images/{normal,tumor,test}_*.tif``, ``ROOT/CAMELYON16/annotations/*.xml``.
* ``"camelyon17"``: ``ROOT/**/centre_<c>/patient_<p>_node_<n>.tif`` (or ``center_<c>``), the labels CSV
  (``stages.csv`` or ``stage_labels.csv`` under ROOT, or ``labels=``: ``patient_<p>_node_<n>.tif,<label>`` with
  labels ``negative`` / ``itc`` / ``micro`` / ``macro``, and ``patient_<p>.zip,pN<stage>`` rows),
  ``ROOT/lesion_annotations/<stem>.xml`` for the annotated slides. Training: the labelled slides; test: the others.
"""
from __future__ import annotations

import csv
import glob
import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Sampler

from ..registry import DATASETS
from .synthetic import ensure_demo_camelyon
from .tiles import CamelyonTiles

__all__ = ["Camelyon16Tiles", "BalancedTileSampler", "find_camelyon16_slides", "CAMELYON16_LAYOUT", "LAYOUTS",
           "SlideEntry", "layout_slides", "holdout_split", "read_slide_labels", "camelyon17_slides",
           "write_split_records", "SPLIT_FILE", "NAMED_SPLITS"]

SPLIT_FILE = "camelyon_split.json"
NAMED_SPLITS = ("training", "train", "val", "test")
_C17_TUMOUR = ("itc", "micro", "macro")


@dataclass(frozen=True)
class _Layout:
    training: Tuple[str, ...]           # globs of the training slides, relative to the root
    test: Tuple[str, ...]               # globs of the test slides
    annotations: Tuple[str, str]        # annotation folder of the training slides, of the test slides
    description: str


LAYOUTS: Dict[str, _Layout] = {
    "challenge": _Layout(("training/tumor/*.tif", "training/normal/*.tif"), ("testing/images/*.tif",),
                         ("lesion_annotations", "testing/lesion_annotations"),
                         "ROOT/training/tumor/tumor_*.tif, ROOT/training/normal/normal_*.tif and "
                         "ROOT/lesion_annotations/tumor_*.xml (evaluation: ROOT/testing/images/test_*.tif and "
                         "ROOT/testing/lesion_annotations/test_*.xml)"),
    "aws": _Layout(("CAMELYON16/images/tumor_*.tif", "CAMELYON16/images/normal_*.tif"),
                   ("CAMELYON16/images/test_*.tif",), ("CAMELYON16/annotations", "CAMELYON16/annotations"),
                   "ROOT/CAMELYON16/images/{normal,tumor,test}_*.tif and ROOT/CAMELYON16/annotations/*.xml (the "
                   "AWS open-data copy: aws s3 sync --no-sign-request s3://camelyon-dataset/CAMELYON16 "
                   "ROOT/CAMELYON16)"),
    "camelyon17": _Layout(("**/cent*_*/patient_*_node_*.tif",), ("**/cent*_*/patient_*_node_*.tif",),
                          ("lesion_annotations", "lesion_annotations"),
                          "ROOT/**/centre_<c>/patient_<p>_node_<n>.tif, a labels CSV (ROOT/stages.csv or "
                          "stage_labels.csv: patient_<p>_node_<n>.tif,negative|itc|micro|macro) and "
                          "ROOT/lesion_annotations/patient_<p>_node_<n>.xml"),
}
CAMELYON16_LAYOUT = LAYOUTS["challenge"].description


@dataclass
class SlideEntry:
    """One slide of a layout: ``tumour`` (True / False; None: unknown, e.g. a test slide without a labels file),
    its annotation ``xml`` (None: none found) and the annotation ``folder`` searched, its ``label`` from a labels
    file and, for Camelyon17, ``centre`` / ``patient`` / ``node``."""

    path: Path
    tumour: Optional[bool]
    xml: Optional[Path]
    folder: Path
    label: Optional[str] = None
    centre: Optional[int] = None
    patient: Optional[int] = None
    node: Optional[int] = None

    @property
    def stem(self) -> str:
        return self.path.stem


# ----------------------------------------------------------------------------------------------- labels files
def read_slide_labels(path: Union[str, os.PathLike]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``(slide labels {stem: label}, patient stages {patient: stage})`` of a CSV whose first column names a slide
    (``patient_000_node_0.tif``, ``Test_001``) or a patient (``patient_000.zip``) and whose second column is its
    label (Camelyon17: ``negative`` / ``itc`` / ``micro`` / ``macro``, ``pN0`` ...; Camelyon16's reference:
    ``Tumor`` / ``Normal``). A header row and further columns are ignored; stems are matched case-insensitively
    (keys are lower case); labels are lower case."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slide labels file not found (expected a CSV: slide,label per row)")
    slides: Dict[str, str] = {}
    patients: Dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f)):
            row = [c.strip() for c in row]
            if len(row) < 2 or not row[0] or row[0].startswith("#"):
                continue
            name, label = row[0], row[1].lower()
            if i == 0 and label in ("stage", "label", "class", "type"):
                continue  # a header
            stem = Path(name).stem.lower() if not name.lower().endswith(".zip") else None
            if name.lower().endswith(".zip"):
                patients[Path(name).stem.lower()] = label
            elif stem:
                slides[stem] = label
    if not slides and not patients:
        raise ValueError(f"{path}: no slide labels (expected rows 'slide,label', e.g. 'patient_000_node_0.tif,"
                         f"negative')")
    return slides, patients


def _is_tumour_label(label: Optional[str]) -> Optional[bool]:
    if label is None:
        return None
    label = label.lower()
    if label in ("negative", "normal", "0", "false", "pn0"):
        return False
    if label in _C17_TUMOUR or label in ("tumor", "tumour", "1", "true") or label.startswith("pn"):
        return True
    return None


def _camelyon17_labels_file(root: Path, labels: Optional[Union[str, os.PathLike]]) -> Optional[Path]:
    if labels is not None:
        return _under(root, labels)
    for pattern in ("stages.csv", "stage_labels.csv", "*/stages.csv", "*/stage_labels.csv"):
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    return None


_C17_NAME = re.compile(r"patient_(\d+)_node_(\d+)$", re.I)
_CENTRE = re.compile(r"cent(?:re|er)_(\d+)$", re.I)


def camelyon17_slides(root: Union[str, os.PathLike], labels: Optional[Union[str, os.PathLike]] = None,
                      annotation_dir: Optional[str] = None) -> List[SlideEntry]:
    """Every Camelyon17 slide under ``root`` (``**/centre_<c>/patient_<p>_node_<n>.tif``, also ``center_<c>``),
    sorted by patient and node, with its centre, patient, node, label (from the labels CSV: ``labels`` or
    ``stages.csv`` / ``stage_labels.csv`` under ``root``; None for an unlabelled, e.g. test, slide), tumour status
    (``itc`` / ``micro`` / ``macro``) and annotation XML (``annotation_dir``, default ``lesion_annotations``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Camelyon17 root not found (expected {LAYOUTS['camelyon17'].description})")
    csv_path = _camelyon17_labels_file(root, labels)
    slide_labels = read_slide_labels(csv_path)[0] if csv_path is not None else {}
    folder = root / (annotation_dir or "lesion_annotations")
    out = []
    for p in sorted(Path(x) for x in glob.glob(str(root / "**" / "patient_*_node_*.tif"), recursive=True)):
        m, c = _C17_NAME.match(p.stem), _CENTRE.match(p.parent.name)
        if m is None:
            continue
        label = slide_labels.get(p.stem.lower())
        xml = folder / f"{p.stem}.xml"
        out.append(SlideEntry(p, _is_tumour_label(label), xml if xml.is_file() else None, folder, label,
                              int(c.group(1)) if c else None, int(m.group(1)), int(m.group(2))))
    if not out:
        raise FileNotFoundError(f"{root}: no Camelyon17 slide (expected {LAYOUTS['camelyon17'].description})")
    out.sort(key=lambda e: (e.patient, e.node, str(e.path)))
    return out


# --------------------------------------------------------------------------------------------- slide lists
def find_camelyon16_slides(root: Union[str, os.PathLike], split: str,
                           description: str = CAMELYON16_LAYOUT) -> List[Path]:
    """Slides of ``split``: a glob relative to ``root`` (``"training/*/*.tif"``) or a ``.txt`` list file (one
    slide per line: a path relative to ``root`` or a stem found under ``root``). Errors name the layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Camelyon16 root not found (expected {description})")
    if split.endswith(".txt"):
        lst = Path(split) if Path(split).is_absolute() else root / split
        if not lst.is_file():
            raise FileNotFoundError(f"{lst}: split list not found (one slide path or stem per line)")
        out = []
        for line in (ln.strip() for ln in lst.read_text().splitlines()):
            if not line or line.startswith("#"):
                continue
            p = root / line
            if not p.is_file():
                hits = sorted(root.glob(f"**/{line}.tif"))
                if not hits:
                    raise FileNotFoundError(f"{lst}: slide {line!r} not found under {root}")
                p = hits[0]
            out.append(p)
        return out
    slides = sorted(Path(p) for p in glob.glob(str(root / split), recursive=True))
    if not slides:
        raise FileNotFoundError(f"{root / split}: no slide matches (expected {description})")
    return slides


def _tumour_by_name(path: Path) -> Optional[bool]:
    """Camelyon16's naming: ``tumor_*`` or a ``tumor`` folder: tumour; ``normal_*`` or ``normal``: normal."""
    name, folder = path.stem.lower(), path.parent.name.lower()
    if name.startswith("tumor") or folder == "tumor":
        return True
    if name.startswith("normal") or folder == "normal":
        return False
    return None


def layout_slides(root: Union[str, os.PathLike], layout: str = "challenge", group: str = "training",
                  annotation_dir: Optional[str] = None, labels: Optional[Union[str, os.PathLike]] = None,
                  slides: Optional[Sequence[Path]] = None) -> List[SlideEntry]:
    """The slides of ``group`` (``"training"`` or ``"test"``) of ``layout`` under ``root`` (or the given
    ``slides``), each with its tumour status (Camelyon16 naming: ``tumor_*`` / a ``tumor`` folder; a slide listed
    as tumour in ``labels``; else whether it has annotations) and its annotation XML (``annotation_dir`` relative
    to ``root``, default the layout's). A tumour slide without annotations is a ``FileNotFoundError`` naming the
    slide and the folder searched (Camelyon17: a labelled positive slide without annotations is kept, with
    ``xml=None``, for the caller to leave out)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} (expected one of {sorted(LAYOUTS)})")
    if group not in ("training", "test"):
        raise ValueError(f"group={group!r} (expected 'training' or 'test')")
    root = Path(root)
    lay = LAYOUTS[layout]
    if layout == "camelyon17":
        entries = camelyon17_slides(root, labels, annotation_dir)
        if slides is not None:
            keep = {Path(s).resolve() for s in slides}
            return [e for e in entries if e.path.resolve() in keep]
        return [e for e in entries if (e.label is not None) == (group == "training")]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Camelyon16 root not found (expected {lay.description})")
    if slides is None:
        patterns = lay.training if group == "training" else lay.test
        slides = sorted({Path(p) for pattern in patterns for p in glob.glob(str(root / pattern))})
        if not slides:
            raise FileNotFoundError(f"{root}: no {group} slide matches {' or '.join(patterns)} (expected layout "
                                    f"{layout!r}: {lay.description})")
    listed = ({k: _is_tumour_label(v) for k, v in read_slide_labels(_under(root, labels))[0].items()}
              if labels else {})
    out = []
    for s in map(Path, slides):
        if annotation_dir is not None:
            folder = root / annotation_dir
        else:
            in_test = group == "test" or (layout == "challenge" and "testing" in s.parts)
            folder = root / lay.annotations[1 if in_test else 0]
        xml = folder / f"{s.stem}.xml"
        xml = xml if xml.is_file() else None
        tumour = listed.get(s.stem.lower())
        if tumour is None:
            tumour = _tumour_by_name(s)
        if tumour is None:
            tumour = xml is not None
        if tumour and xml is None:
            raise FileNotFoundError(f"{s}: tumour slide without lesion annotations: {s.stem}.xml not found in "
                                    f"{folder} (layout {layout!r}: {lay.description}; or set "
                                    f"data.<split>.kwargs.annotation_dir)")
        label = None if s.stem.lower() not in listed else ("tumour" if listed[s.stem.lower()] else "normal")
        out.append(SlideEntry(s, tumour, xml, folder, label))
    return out


def _under(root: Path, path: Union[str, os.PathLike]) -> Path:
    """``path`` as given when it exists (or is absolute), else relative to ``root``."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p


# ------------------------------------------------------------------------------------------------ holdout
def _read_holdout_list(spec: Union[str, os.PathLike], root: Path) -> List[str]:
    """Validation slide stems from a ``.txt`` list (one stem or path per line) or a ``.json`` split record
    (``camelyon_split.json`` of a run: its ``val`` slides)."""
    p = _under(root, spec)
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


# ------------------------------------------------------------------------------------------------ dataset
@DATASETS.register("camelyon16")
class Camelyon16Tiles(CamelyonTiles):
    """:class:`CamelyonTiles` over a Camelyon layout under ``root`` (see the module docstring).

    ``split``: ``"train"`` (the training slides less the validation ones), ``"val"`` (the validation slides:
    ``holdout`` of the training slides, see :func:`holdout_split`; seeded by ``seed``), ``"training"`` (all training
    slides), ``"test"`` (the test slides), or a glob relative to ``root`` / a ``.txt`` list (see
    :func:`find_camelyon16_slides`). ``layout``: ``"challenge"``, ``"aws"`` or ``"camelyon17"``. Each slide's
    annotations are ``<annotation folder>/<stem>.xml`` (``annotation_dir`` relative to ``root``; default the
    layout's folder for the slide); a tumour slide (``tumor_*``, in a ``tumor`` folder, or listed as tumour in
    ``labels``, a CSV of ``slide,label``) without one is an error naming the slide and the folder (Camelyon17: such
    slides, labelled positive but not annotated, are left out and listed in the split record). ``generate`` (dict
    of :func:`~pce.datasets.camelyon.synthetic.make_demo_camelyon` options, or True) writes the generated demo
    slides into ``root`` first when they are not there.

    ``split_record`` (JSON-ready) records the layout, the split, the slides with their tumour status, the train /
    validation slide lists, the tiles kept (``max_tiles``) and the resolution of every slide;
    :func:`write_split_records` writes the records of a run's datasets to ``<work dir>/camelyon_split.json``.
    """

    split_record_file = SPLIT_FILE
    uses_runtime_seed = True  # the task adapter passes runtime.seed as ``seed`` when the config does not set it

    def __init__(self, root: Union[str, os.PathLike], split: str = "training", layout: str = "challenge",
                 annotation_dir: Optional[str] = None, holdout: Union[None, float, str] = 0.2,
                 labels: Optional[str] = None, generate: Union[None, bool, Mapping[str, Any]] = None,
                 **kwargs: Any) -> None:
        root = Path(root)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} (expected one of {sorted(LAYOUTS)})")
        if generate:
            ensure_demo_camelyon(root, **(dict(generate) if isinstance(generate, Mapping) else {}))
        if layout == "aws" and not (root / "CAMELYON16").is_dir() and (root / "images").is_dir():
            root = root.parent if root.name == "CAMELYON16" else root  # ROOT given as the CAMELYON16 folder itself
        seed = int(kwargs.get("seed", 0))
        record: Dict[str, Any] = {"dataset": "camelyon16", "layout": layout, "root": str(root), "split": split,
                                  "seed": seed}
        left_out: List[str] = []
        if split in NAMED_SPLITS:
            group = "test" if split == "test" else "training"
            entries = layout_slides(root, layout, group, annotation_dir, labels)
            if layout == "camelyon17":
                left_out = [e.stem for e in entries if e.tumour and e.xml is None]
                entries = [e for e in entries if not (e.tumour and e.xml is None)]
                if not entries:
                    raise FileNotFoundError(f"{root}: no Camelyon17 {group} slide with annotations or a negative "
                                            f"label (expected {LAYOUTS[layout].description})")
            if split in ("train", "val"):
                train, val = holdout_split(entries, holdout, seed, root)
                record.update(holdout=str(holdout) if isinstance(holdout, (str, os.PathLike)) else holdout,
                              train=[e.stem for e in train], val=[e.stem for e in val])
                entries = train if split == "train" else val
                if not entries:
                    raise ValueError(f"{root}: split={split!r} holds no slide: holdout={holdout} of "
                                     f"{len(train)} training slides ({sum(bool(e.tumour) for e in train)} tumour) "
                                     f"(give more training slides, another holdout fraction, or a slide list)")
        else:
            paths = find_camelyon16_slides(root, split, LAYOUTS[layout].description)
            group = "test" if any(part in ("testing", "test") for part in Path(split).parts) else "training"
            entries = layout_slides(root, layout, group, annotation_dir, labels, slides=paths)
        if left_out:
            record["left_out"] = {"reason": "labelled tumour without lesion annotations", "slides": left_out}
        self.root, self.layout, self.entries = root, layout, entries
        super().__init__([e.path for e in entries], [e.xml for e in entries], **kwargs)
        tumour_slides = [e.stem for e in entries if e.tumour]
        if tumour_slides and split != "test" and not self.num_index_tumour_tiles:
            raise ValueError(f"{root}: {len(tumour_slides)} tumour slide(s) in split={split!r} ({tumour_slides[0]}, "
                             f"...) but no tile holds tumour (check the annotations' groups against label_map, "
                             f"min_tissue and the tile resolution)")
        pos = self.positive_tiles()
        per_slide = np.bincount(self.tiles.columns["slide_index"], minlength=len(entries))
        record.update(
            slides=[e.stem for e in entries], tumour_slides=tumour_slides,
            tiles={"num_tiles": len(self.tiles), "num_tumour_tiles": int(pos.sum()),
                   "num_tissue_tiles": self.num_index_tiles, "max_tiles": self.max_tiles,
                   "max_tiles_tumour": self.max_tiles_tumour if self.max_tiles is not None else None,
                   "per_slide": {e.stem: int(n) for e, n in zip(entries, per_slide)}},
            resolution={"tile_size": self.tile_size, "stride": self.stride,
                        "per_slide": {e.stem: {"level": g.level, "scale": g.scale, "mpp": g.mpp}
                                      for e, g in zip(entries, self.geometries)}})
        self.split_record = record


def _signature() -> inspect.Signature:
    """``Camelyon16Tiles``' own arguments followed by those of :class:`CamelyonTiles` it passes on, so that a
    config's typo in ``data.<split>.kwargs`` is named before anything is read (``tasks.common.check_kwargs``)."""
    own = list(inspect.signature(Camelyon16Tiles.__init__).parameters.values())[:-1]  # without **kwargs
    base = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for n, p in inspect.signature(CamelyonTiles.__init__).parameters.items()
            if n not in ("self", "slides", "annotations")]
    return inspect.Signature(own + base)


Camelyon16Tiles.__init__.__signature__ = _signature()


# ------------------------------------------------------------------------------------------- split records
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


class BalancedTileSampler(Sampler[int]):
    """Draws ``num_samples`` tile indices per epoch (default ``len(dataset)``), a fraction ``tumour_fraction``
    of them from the tumour tiles (``tumour > 0``, or ``label`` in classify mode), with replacement. With
    ``num_replicas`` > 1 each rank gets its own ``num_samples // num_replicas`` draws; call :meth:`set_epoch`."""

    def __init__(self, dataset: CamelyonTiles, tumour_fraction: float = 0.5, num_samples: Optional[int] = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        pos = dataset.positive_tiles()
        self.pos, self.neg = np.flatnonzero(pos), np.flatnonzero(~pos)
        if not len(self.pos) or not len(self.neg):
            raise ValueError(f"BalancedTileSampler: {len(self.pos)} tumour and {len(self.neg)} normal tiles "
                             f"(both kinds are needed)")
        self.fraction = float(tumour_fraction)
        self.num_samples = int(num_samples or len(dataset.tiles)) // int(num_replicas)
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = np.random.default_rng([self.seed, self.epoch, self.rank])
        is_pos = g.random(self.num_samples) < self.fraction
        out = np.where(is_pos, self.pos[g.integers(len(self.pos), size=self.num_samples)],
                       self.neg[g.integers(len(self.neg), size=self.num_samples)])
        return iter(out.tolist())
