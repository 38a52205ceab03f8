"""The Camelyon16 folder layout as a dataset, the generated demo in that layout, and a balanced sampler."""
from __future__ import annotations

import glob
import inspect
import os
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Union

import numpy as np
from torch.utils.data import Sampler

from ..registry import DATASETS
from .synthetic import ensure_demo_camelyon
from .tiles import CamelyonTiles

__all__ = ["Camelyon16Tiles", "BalancedTileSampler", "find_camelyon16_slides", "CAMELYON16_LAYOUT"]

CAMELYON16_LAYOUT = ("ROOT/training/tumor/tumor_*.tif, ROOT/training/normal/normal_*.tif and "
                     "ROOT/lesion_annotations/tumor_*.xml (evaluation: ROOT/testing/images/test_*.tif and "
                     "ROOT/testing/lesion_annotations/test_*.xml)")


def find_camelyon16_slides(root: Union[str, os.PathLike], split: str) -> List[Path]:
    """Slides of ``split``: a glob relative to ``root`` (``"training/*/*.tif"``) or a ``.txt`` list file (one
    slide per line: a path relative to ``root`` or a stem found under ``root``). Errors name the layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Camelyon16 root not found (expected {CAMELYON16_LAYOUT})")
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
    slides = sorted(Path(p) for p in glob.glob(str(root / split)))
    if not slides:
        raise FileNotFoundError(f"{root / split}: no slide matches (expected {CAMELYON16_LAYOUT})")
    return slides


@DATASETS.register("camelyon16")
class Camelyon16Tiles(CamelyonTiles):
    """:class:`CamelyonTiles` over the Camelyon16 layout under ``root``.

    ``split``: glob or list file (see :func:`find_camelyon16_slides`); each slide's annotations are
    ``root/annotation_dir/<stem>.xml`` when present (a slide in a ``tumor`` folder must have one), otherwise the
    slide has no tumour. ``generate`` (dict of :func:`~pce.datasets.camelyon.synthetic.make_demo_camelyon`
    options, or True) writes the generated demo slides into ``root`` first when they are not there.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "training/*/*.tif",
                 annotation_dir: str = "lesion_annotations", generate: Union[None, bool, Mapping[str, Any]] = None,
                 **kwargs: Any) -> None:
        root = Path(root)
        if generate:
            ensure_demo_camelyon(root, **(dict(generate) if isinstance(generate, Mapping) else {}))
        slides = find_camelyon16_slides(root, split)
        annotations = []
        for s in slides:
            xml = root / annotation_dir / f"{s.stem}.xml"
            if not xml.is_file() and s.parent.name.lower() == "tumor":
                raise FileNotFoundError(f"{xml}: lesion annotations of tumour slide {s} not found "
                                        f"(expected {CAMELYON16_LAYOUT})")
            annotations.append(xml if xml.is_file() else None)
        self.root = root
        super().__init__(slides, annotations, **kwargs)


def _signature() -> inspect.Signature:
    """``Camelyon16Tiles``' own arguments followed by those of :class:`CamelyonTiles` it passes on, so that a
    config's typo in ``data.<split>.kwargs`` is named before anything is read (``tasks.common.check_kwargs``)."""
    own = list(inspect.signature(Camelyon16Tiles.__init__).parameters.values())[:-1]  # without **kwargs
    base = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for n, p in inspect.signature(CamelyonTiles.__init__).parameters.items()
            if n not in ("self", "slides", "annotations")]
    return inspect.Signature(own + base)


Camelyon16Tiles.__init__.__signature__ = _signature()


class BalancedTileSampler(Sampler[int]):
    """Draws ``num_samples`` tile indices per epoch (default ``len(dataset)``), a fraction ``tumour_fraction``
    of them from the tumour tiles (``tumour > 0``, or ``label`` in classify mode), with replacement. With
    ``num_replicas`` > 1 each rank gets its own ``num_samples // num_replicas`` draws; call :meth:`set_epoch`."""

    def __init__(self, dataset: CamelyonTiles, tumour_fraction: float = 0.5, num_samples: Optional[int] = None,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        pos = np.array([dataset._positive(t) for t in dataset.tiles], bool)
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
