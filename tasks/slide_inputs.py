"""The inputs of a whole-slide inference run, checked before any slide is processed: distinct slide stems, every
slide's level-0 size and microns per pixel, the annotations (``<stem>.xml``) and a labels CSV; a slide's label
from its annotations. Used by ``tools/infer_slide.py`` (heat-maps: :mod:`pce.tasks.slide_inference`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pce.datasets.camelyon import annotation_labels, open_slide, read_asap_xml, read_slide_labels, slide_mpp
from pce.datasets.camelyon.index import check_inside
from pce.engine.errors import PCEError

__all__ = ["check_stems", "slide_infos", "load_annotations", "slide_label", "read_labels"]


def check_stems(slides: Sequence[Path]) -> None:
    """``PCEError`` listing the slides that share a file stem (their outputs and ``<stem>.xml`` would be one)."""
    seen: Dict[str, List[Path]] = {}
    for s in slides:
        seen.setdefault(s.stem.casefold(), []).append(s)
    for same in seen.values():
        if len(same) > 1:
            raise PCEError(", ".join(map(str, same)),
                           f"{len(same)} slides share the file stem {same[0].stem!r}: their outputs "
                           f"({same[0].stem}_heatmap.png, ...) and annotations ({same[0].stem}.xml) would be the "
                           f"same files", "slides with distinct file stems: rename one, or run each into its own --out")


def slide_infos(slides: Sequence[Path], mpp_flag: Optional[float], need_mpp: bool) -> Dict[Path, Dict[str, Any]]:
    """Level-0 size and microns per pixel of every slide (opened here, so an unreadable one fails before the model
    is loaded): the slide's own mpp tags, else ``--mpp``; none while the FROC needs it is an error naming the slide."""
    out = {}
    for s in slides:
        with open_slide(s) as sl:
            dims, own = tuple(sl.dimensions), slide_mpp(sl)
        if own is None and mpp_flag is None and need_mpp:
            raise PCEError(s, "the slide records no microns per pixel (openslide.mpp-x / mpp-y), which the FROC "
                              "needs to measure lesions", "--mpp X: the level-0 microns per pixel of its scanner, "
                                                          "e.g. --mpp 0.243 for Camelyon16's")
        if own is not None and mpp_flag is not None and abs(own - mpp_flag) > 0.01 * own:
            print(f"note: {s}: the slide records {own:g} um/px; --mpp {mpp_flag:g} applies only to slides that record "
                  f"none", file=sys.stderr)
        out[s] = {"dims": dims, "mpp": own if own is not None else mpp_flag,
                  "mpp_source": "slide" if own is not None else ("--mpp" if mpp_flag is not None else None)}
    return out


def load_annotations(xml_dir: Path, slides: Sequence[Path], infos: Dict[Path, Dict[str, Any]],
                     label_map: Optional[Dict[str, int]]) -> Dict[Path, Optional[list]]:
    """Every slide's annotations (``xml_dir/<stem>.xml``, None for a slide without one), read and checked before
    any slide is processed: the folder must hold the XML of at least one slide, every group must be in the label
    map and every coordinate inside its slide (errors name the XML)."""
    if not xml_dir.is_dir():
        raise PCEError(xml_dir, "annotation folder not found", "a folder of ASAP XML files named <slide stem>.xml")
    xmls = {s: xml_dir / f"{s.stem}.xml" for s in slides}
    if not any(x.is_file() for x in xmls.values()):
        names = [x.name for x in xmls.values()]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise PCEError(xml_dir, f"holds the annotations of none of the slides (looked for {shown})",
                       "the ASAP XML of each tumour slide, named <slide stem>.xml; a slide without one is normal")
    out: Dict[Path, Optional[list]] = {}
    for s, xml in xmls.items():
        if not xml.is_file():
            out[s] = None
            continue
        anns = read_asap_xml(xml)
        annotation_labels(anns, label_map, source=str(xml))
        check_inside(anns, infos[s]["dims"], str(xml))
        out[s] = anns
    return out


def slide_label(anns: Optional[list], label_map: Optional[Dict[str, int]]) -> int:
    """1 when the slide's annotations hold a tumour polygon (however small), else 0."""
    if not anns:
        return 0
    return int(any(lab > 0 and a.kind == "polygon" for a, lab in zip(anns, annotation_labels(anns, label_map))))


def read_labels(path: Path, slides: Sequence[Path]) -> Dict[Path, int]:
    """Every slide's label (1: tumour) from a CSV of ``slide,label`` rows (Camelyon17's ``stages.csv``:
    ``negative`` -> 0, ``itc`` / ``micro`` / ``macro`` -> 1; Camelyon16's reference: ``Normal`` / ``Tumor``); a slide
    missing from it is an error naming it."""
    try:
        table = read_slide_labels(path)[0]
    except (OSError, ValueError) as e:
        raise PCEError(path, str(e).split(": ", 1)[-1], "a CSV of slide,label rows") from None
    missing = [s for s in slides if s.stem.lower() not in table]
    if missing:
        raise PCEError(path, f"has no label for {len(missing)} slide(s) ({', '.join(m.name for m in missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''})", "a slide,label row for every slide")
    return {s: int(table[s.stem.lower()] not in ("negative", "normal", "0", "false")) for s in slides}
