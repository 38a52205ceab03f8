"""Camelyon17's layout: ``ROOT/**/centre_<c>/patient_<p>_node_<n>.tif`` (or ``center_<c>``), a labels CSV
(``stages.csv`` / ``stage_labels.csv`` under ROOT, or ``labels=``) and ``ROOT/lesion_annotations/<stem>.xml``:
the slide list with centre, patient, node, label and tumour status (:func:`camelyon17_slides`)."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import List, Optional, Union

from .layout_table import LAYOUTS, SlideEntry, under_root
from .slide_labels import is_tumour_label, read_slide_labels

__all__ = ["camelyon17_slides"]


def _camelyon17_labels_file(root: Path, labels: Optional[Union[str, os.PathLike]]) -> Optional[Path]:
    if labels is not None:
        return under_root(root, labels)
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
        out.append(SlideEntry(p, is_tumour_label(label), xml if xml.is_file() else None, folder, label,
                              int(c.group(1)) if c else None, int(m.group(1)), int(m.group(2))))
    if not out:
        raise FileNotFoundError(f"{root}: no Camelyon17 slide (expected {LAYOUTS['camelyon17'].description})")
    out.sort(key=lambda e: (e.patient, e.node, str(e.path)))
    return out

