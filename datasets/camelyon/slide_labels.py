"""Slide labels files: a CSV of ``slide,label`` rows (Camelyon17's ``stages.csv`` / ``stage_labels.csv``,
Camelyon16's reference) read into slide labels and patient stages, and whether a label means tumour."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

__all__ = ["read_slide_labels", "is_tumour_label", "C17_TUMOUR"]

C17_TUMOUR = ("itc", "micro", "macro")


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


def is_tumour_label(label: Optional[str]) -> Optional[bool]:
    if label is None:
        return None
    label = label.lower()
    if label in ("negative", "normal", "0", "false", "pn0"):
        return False
    if label in C17_TUMOUR or label in ("tumor", "tumour", "1", "true") or label.startswith("pn"):
        return True
    return None

