"""What a Camelyon folder layout is: the table of layouts (``LAYOUTS``: where the training / test slides and their
annotations lie under ``data.root``, and the description errors quote) and ``SlideEntry``, one slide of a layout.

Slide discovery per layout: :mod:`.layout` (Camelyon16: challenge / aws) and :mod:`.camelyon17`; the labels CSV:
:mod:`.slide_labels`; the train / val holdout and the split records: :mod:`.splits`; the dataset: :mod:`.camelyon16`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

__all__ = ["LAYOUTS", "CAMELYON16_LAYOUT", "SlideEntry", "under_root"]


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



def under_root(root: Path, path: Union[str, os.PathLike]) -> Path:
    """``path`` as given when it exists (or is absolute), else relative to ``root``."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p

