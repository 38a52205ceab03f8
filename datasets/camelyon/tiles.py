"""``CamelyonTiles``: a dataset over the tissue tiles of whole slides (tumour masks or tile labels from ASAP
annotations), ``Camelyon16Tiles``: the same over the Camelyon16 folder layout, and a balanced sampler."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..registry import DATASETS
from .annotations import Annotation, annotation_labels, read_asap_xml, rasterize
from .index import index_slide
from .slide import choose_level, open_slide, read_rgb

__all__ = ["CamelyonTiles", "MODES"]

MODES = ("segment", "classify")
AnnotationsArg = Union[None, Sequence[Any], Mapping[str, Any]]


def _load_annotations(entry: Any) -> tuple:
    """``(annotations or None, xml path or None)`` of one ``annotations`` entry (None, a path or a list)."""
    if entry is None:
        return None, None
    if isinstance(entry, (str, os.PathLike)):
        return read_asap_xml(entry), Path(entry)
    return list(entry), None


def _align_annotations(slides: List[Path], annotations: AnnotationsArg) -> List[Any]:
    """One entry per slide from a list (aligned with ``slides``) or a dict keyed by slide path or stem."""
    if annotations is None:
        return [None] * len(slides)
    if isinstance(annotations, Mapping):
        keys = {str(p): i for i, p in enumerate(slides)}
        keys.update({p.stem: i for i, p in enumerate(slides)})
        out: List[Any] = [None] * len(slides)
        for k, v in annotations.items():
            if str(k) not in keys:
                raise ValueError(f"{v}: annotations given for slide {k!r}, which is not in the slide list "
                                 f"(expected a path or stem of one of {[p.name for p in slides]})")
            out[keys[str(k)]] = v
        return out
    annotations = list(annotations)
    if len(annotations) != len(slides):
        raise ValueError(f"annotations: {len(annotations)} entries for {len(slides)} slides (expected one per "
                         f"slide, None for a slide without tumour, or a dict keyed by slide)")
    return annotations


@DATASETS.register("camelyon_tiles")
class CamelyonTiles(Dataset):
    """Tiles of whole slides at ``level`` (grid origin (0, 0), step ``stride`` level pixels, default
    ``tile_size``) whose tissue fraction is >= ``min_tissue``.

    ``ds.tiles[i]``: ``{"slide", "slide_index", "x", "y" (level-0 top-left), "level", "size", "tissue",
    "tumour" (fractions), "label" (tumour in the central third)}``. ``ds[i]`` -> ``(image float32 [3, s, s] RGB
    in [0, 1] or through ``transform``, target)``: ``int64 [s, s]`` mask (``mode="segment"``) or the tile label
    (``mode="classify"``). ``annotations``: None, one entry per slide (None / XML path / list of
    :class:`Annotation`) or a dict keyed by slide path or stem. ``mpp`` / ``downsample`` choose each slide's
    level instead of ``level``. ``balance=p`` makes an epoch of ``epoch_size`` (default: all tiles) draws, a
    fraction ``p`` of them tumour tiles: after :meth:`set_epoch` draw ``i`` is a function of ``(seed, epoch, i)``
    alone (the same tiles with any number of DataLoader workers, and after a resume); before it, of the torch RNG
    of the process that loads the sample (which a trainer seeds and restores on resume, and DataLoader seeds per
    worker and epoch). Slides are opened lazily, once per process (DataLoader worker); the index is cached under
    ``cache_dir``. A tile that does not decode is an ``OSError`` naming the slide and the tile.
    """

    def __init__(self, slides: Sequence[Union[str, os.PathLike]], annotations: AnnotationsArg = None,
                 level: int = 0, tile_size: int = 256, stride: Optional[int] = None, min_tissue: float = 0.5,
                 mode: str = "segment", label_map: Optional[Mapping[str, int]] = None,
                 transform: Optional[Callable] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 mpp: Optional[float] = None, downsample: Optional[float] = None, balance: Optional[float] = None,
                 epoch_size: Optional[int] = None, tissue_level: Optional[int] = None,
                 transforms: Optional[Callable] = None, seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} (expected one of {MODES})")
        if int(tile_size) < 1 or (stride is not None and int(stride) < 1):
            raise ValueError(f"tile_size={tile_size} and stride={stride} must be positive")
        if int(seed) < 0:
            raise ValueError(f"seed={seed} (expected a non-negative integer)")
        if balance is not None and not 0.0 <= float(balance) <= 1.0:
            raise ValueError(f"balance={balance} (expected a tumour fraction in [0, 1] or None)")
        self.slides = [Path(s) for s in slides]
        if not self.slides:
            raise ValueError("CamelyonTiles: empty slide list")
        self.mode, self.tile_size = mode, int(tile_size)
        self.stride = int(stride) if stride is not None else self.tile_size
        self.label_map = dict(label_map) if label_map is not None else None
        self.transform = transform if transform is not None else transforms
        self.classes = ("background", "tumour") if mode == "segment" else ("normal", "tumour")
        loaded = [_load_annotations(e) for e in _align_annotations(self.slides, annotations)]
        self.annotations: List[Optional[List[Annotation]]] = [a for a, _ in loaded]
        for path, (anns, xml) in zip(self.slides, loaded):  # an unknown group fails here, naming its XML
            annotation_labels(anns or [], self.label_map, source=str(xml or path))
        self.levels: List[int] = []
        self.downsamples: List[float] = []
        self.tiles: List[Dict[str, Any]] = []
        cache = Path(cache_dir) if cache_dir is not None else None
        for path in self.slides:  # fail before scanning any slide
            if not path.is_file():
                raise FileNotFoundError(f"{path}: slide not found (expected a whole-slide image file: .tif, .svs, ...)")
        for k, (path, (anns, xml)) in enumerate(zip(self.slides, loaded)):
            lvl = self._level(path, level, mpp, downsample)
            idx = index_slide(path, anns, lvl, self.tile_size, self.stride, float(min_tissue), self.label_map,
                              cache, xml, tissue_level)
            self.levels.append(lvl)
            self.downsamples.append(float(idx["downsample"]))
            for x, y, t, u, c in zip(idx["x"], idx["y"], idx["tissue"], idx["tumour"], idx["centre"]):
                self.tiles.append({"slide": str(path), "slide_index": k, "x": int(x), "y": int(y), "level": lvl,
                                   "size": self.tile_size, "tissue": float(t), "tumour": float(u),
                                   "label": int(c)})
        self.level = self.levels[0]
        self.balance = None if balance is None else float(balance)
        self.seed, self.epoch = int(seed), None
        self.epoch_size = int(epoch_size) if epoch_size else len(self.tiles)
        pos = np.array([self._positive(t) for t in self.tiles], bool)
        self._pools = (np.flatnonzero(pos), np.flatnonzero(~pos))
        self._handles: Dict[int, Any] = {}
        self._owner: Any = None

    # --------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _level(path: Path, level: int, mpp: Optional[float], downsample: Optional[float]) -> int:
        if mpp is None and downsample is None:
            return int(level)
        with open_slide(path) as s:
            return choose_level(s, downsample=downsample, mpp=mpp, source=str(path))

    def _positive(self, t: Mapping[str, Any]) -> bool:
        return bool(t["label"]) if self.mode == "classify" else t["tumour"] > 0

    @property
    def transforms(self) -> Optional[Callable]:
        """Alias of ``transform`` (the name the task adapters use)."""
        return self.transform

    @transforms.setter
    def transforms(self, value: Optional[Callable]) -> None:
        self.transform = value

    def _process_key(self) -> tuple:
        info = get_worker_info()
        return os.getpid(), info.id if info is not None else None

    def _this_process(self) -> None:
        """Forget handles inherited from another process (a forked DataLoader worker)."""
        if self._owner != self._process_key():
            self._handles, self._owner = {}, self._process_key()

    def _handle(self, k: int) -> Any:
        """The open slide ``k`` of this process, opened on first use (never pickled, never shared)."""
        self._this_process()
        if k not in self._handles:
            self._handles[k] = open_slide(self.slides[k])
        return self._handles[k]

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handles={}, _owner=None)
        return state

    def close(self) -> None:
        """Close this process's slide handles."""
        for h in self._handles.values():
            h.close()
        self._handles = {}

    # --------------------------------------------------------------------------------------- dataset
    def __len__(self) -> int:
        return self.epoch_size if self.balance is not None else len(self.tiles)

    def set_epoch(self, epoch: int) -> None:
        """Key the balanced draws of the coming epoch by ``(seed, epoch, draw index)``: an epoch's tiles no longer
        depend on the process, the number of workers or what was drawn before (an exact resume)."""
        self.epoch = int(epoch)

    def _balanced(self, i: int) -> int:
        """Tile of draw ``i``: the first ``round(balance * epoch_size)`` draws are tumour tiles, the rest normal
        ones, each uniform in its pool (see the class docstring for what seeds it)."""
        pos, neg = self._pools
        n_pos = round(self.balance * self.epoch_size) if len(pos) else 0
        pool = pos if (i < n_pos or not len(neg)) else neg
        if self.epoch is None:  # the process's torch RNG: restored by a resumed trainer, seeded per worker and epoch
            return int(pool[int(torch.randint(len(pool), ()))])
        return int(pool[np.random.default_rng([self.seed, self.epoch, int(i)]).integers(len(pool))])

    def read_tile(self, i: int) -> np.ndarray:
        """``uint8 [s, s, 3]`` RGB of tile ``i`` (index into ``tiles``)."""
        t = self.tiles[i]
        return read_rgb(self._handle(t["slide_index"]), (t["x"], t["y"]), t["level"], (t["size"], t["size"]))

    def tile_mask(self, i: int) -> np.ndarray:
        """``uint8 [s, s]`` label mask of tile ``i`` at its level."""
        t = self.tiles[i]
        anns = self.annotations[t["slide_index"]]
        if not anns:
            return np.zeros((t["size"], t["size"]), np.uint8)
        return rasterize(anns, (t["x"], t["y"]), (t["size"], t["size"]), self.downsamples[t["slide_index"]],
                         self.label_map)

    def __getitem__(self, i: int):
        if self.balance is not None:
            if not 0 <= i < self.epoch_size:
                raise IndexError(i)
            i = self._balanced(i)
        image = torch.from_numpy(self.read_tile(i)).permute(2, 0, 1).float().div_(255.0)
        if self.mode == "segment":
            target = torch.from_numpy(self.tile_mask(i).astype(np.int64))
            return self.transform(image, target) if self.transform is not None else (image, target)
        target = int(self.tiles[i]["label"])
        return (self.transform(image) if self.transform is not None else image), target
