"""Slide discovery per Camelyon folder layout: Camelyon16 as the challenge distributed it or as the AWS open-data
registry holds it (:func:`find_camelyon16_slides`, :func:`layout_slides`), Camelyon17's centres / patients / nodes
(:func:`layout_slides` through :func:`~.camelyon17.camelyon17_slides`), each slide with its tumour status and
annotation XML.

What lives where: the layout table and ``SlideEntry``: :mod:`.layout_table`; labels CSVs: :mod:`.slide_labels`;
Camelyon17's slide list: :mod:`.camelyon17`; the train / val holdout and split records: :mod:`.splits`; the
``camelyon16`` dataset: :mod:`.camelyon16`; the balanced sampler: :mod:`.sampler`.

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

import glob
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .camelyon17 import camelyon17_slides
from .layout_table import CAMELYON16_LAYOUT, LAYOUTS, SlideEntry, under_root
from .slide_labels import is_tumour_label, read_slide_labels

__all__ = ["find_camelyon16_slides", "layout_slides", "CAMELYON16_LAYOUT", "LAYOUTS", "SlideEntry",
           "read_slide_labels", "camelyon17_slides"]


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
    listed = ({k: is_tumour_label(v) for k, v in read_slide_labels(under_root(root, labels))[0].items()}
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

