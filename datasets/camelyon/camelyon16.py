"""The ``camelyon16`` dataset (:class:`Camelyon16Tiles`): :class:`~.tiles.CamelyonTiles` over a Camelyon folder
layout (challenge / aws / camelyon17, see :mod:`.layout`), a named split of it (training, train, val, test: the
holdout of :mod:`.splits`) or a glob / list, with the JSON-ready ``split_record`` of what it holds."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from ..registry import DATASETS
from .layout import find_camelyon16_slides, layout_slides
from .layout_table import LAYOUTS
from .splits import NAMED_SPLITS, SPLIT_FILE, holdout_split
from .synthetic import ensure_demo_camelyon
from .tiles import CamelyonTiles

__all__ = ["Camelyon16Tiles"]


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
