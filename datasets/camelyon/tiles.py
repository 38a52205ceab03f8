"""``CamelyonTiles``: a dataset over the tissue tiles of whole slides (tumour masks or tile labels from ASAP
annotations) at a level or at a resolution in microns per pixel (read from the closest finer-or-equal level and
resampled), optionally a fixed, seeded subset of them spread over the slides. The tile columns (``TileTable``) and
the subset selection (``spread_subset``) live in :mod:`.tile_table` (re-exported here)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..registry import DATASETS
from .annotations import Annotation, annotation_labels, read_asap_xml, rasterize
from .index import index_slide
from .slide import TileGeometry, open_slide, read_tile_rgb, tile_geometry
from .tile_table import COLUMNS as _COLUMNS, TileTable, spread_subset

__all__ = ["CamelyonTiles", "TileTable", "spread_subset", "MODES"]

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



def _check_options(mode: str, tile_size: int, stride: Optional[int], seed: int, balance: Optional[float],
                   max_tiles: Optional[int], max_tiles_tumour: Optional[float], level: Optional[int],
                   mpp: Optional[float], downsample: Optional[float], level0_mpp: Optional[float]) -> None:
    """``ValueError`` naming the first :class:`CamelyonTiles` option out of range (before any slide is read)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} (expected one of {MODES})")
    if int(tile_size) < 1 or (stride is not None and int(stride) < 1):
        raise ValueError(f"tile_size={tile_size} and stride={stride} must be positive")
    if int(seed) < 0:
        raise ValueError(f"seed={seed} (expected a non-negative integer)")
    if balance is not None and not 0.0 <= float(balance) <= 1.0:
        raise ValueError(f"balance={balance} (expected a tumour fraction in [0, 1] or None)")
    if max_tiles is not None and int(max_tiles) < 1:
        raise ValueError(f"max_tiles={max_tiles} (expected a positive number of tiles or None)")
    if max_tiles_tumour is not None and not 0.0 <= float(max_tiles_tumour) <= 1.0:
        raise ValueError(f"max_tiles_tumour={max_tiles_tumour} (expected a tumour fraction in [0, 1] or None)")
    for name, v in (("mpp", mpp), ("downsample", downsample), ("level0_mpp", level0_mpp)):
        if v is not None and not (np.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name}={v} (expected a positive number or None)")
    if sum(v is not None for v in (level, mpp, downsample)) > 1:
        raise ValueError(f"give one of level={level}, mpp={mpp}, downsample={downsample} (the tile resolution), "
                         f"not several")


@DATASETS.register("camelyon_tiles")
class CamelyonTiles(Dataset):
    """Tiles of whole slides whose tissue fraction is >= ``min_tissue``, on a grid from (0, 0) with step ``stride``
    output pixels (default ``tile_size``).

    Resolution, one of: ``mpp`` (microns per pixel of the tiles: each slide is read from its level whose mpp is
    the closest finer-or-equal one and resampled, i.e. a proportionally larger region is read and resized; a level
    within 1% of the target is read as it is), ``downsample`` (the same with a target in level-0 pixels per tile
    pixel) or ``level`` (an index, read as it is; none of them: level 0). ``level0_mpp`` stands in for slides that
    record no microns per pixel.

    ``ds.tiles`` (:class:`TileTable`): ``ds.tiles[i]`` = ``{"slide", "slide_index", "x", "y" (level-0 top-left),
    "col", "row", "level", "size", "mpp", "tissue", "tumour" (fractions), "label" (tumour in the central third)}``.
    ``ds[i]`` -> ``(image float32 [3, s, s] RGB in [0, 1] or through ``transform``, target)``: ``int64 [s, s]``
    mask (``mode="segment"``) or the tile label (``mode="classify"``). ``annotations``: None, one entry per slide
    (None / XML path / list of :class:`Annotation`) or a dict keyed by slide path or stem.

    ``max_tiles=n`` keeps a fixed subset of at most ``n`` tiles (:func:`spread_subset`: a function of ``seed``,
    spread evenly over the slides, a fraction ``max_tiles_tumour`` of tumour tiles when there are enough; None: the
    slides' own ratio), e.g. to validate during training without reading every tissue tile.
    ``balance=p`` makes an epoch of ``epoch_size`` (default: all tiles) draws, a fraction ``p`` of them tumour
    tiles: after :meth:`set_epoch` draw ``i`` is a function of ``(seed, epoch, i)`` alone (the same tiles with any
    number of DataLoader workers, and after a resume); before it, of the torch RNG of the process that loads the
    sample (which a trainer seeds and restores on resume, and DataLoader seeds per worker and epoch). Slides are
    opened lazily, once per process (DataLoader worker); the index is cached under ``cache_dir``. A tile that does
    not decode is an ``OSError`` naming the slide and the tile.
    """

    @staticmethod
    def classes_for(mode: str = "segment", **_: Any) -> Tuple[str, str]:
        """The class names of a dataset built with these keyword arguments (without reading any slide): pixel
        classes in ``"segment"`` mode, tile labels in ``"classify"`` mode."""
        return ("background", "tumour") if mode == "segment" else ("normal", "tumour")

    def __init__(self, slides: Sequence[Union[str, os.PathLike]], annotations: AnnotationsArg = None,
                 level: Optional[int] = None, tile_size: int = 256, stride: Optional[int] = None,
                 min_tissue: float = 0.5, mode: str = "segment", label_map: Optional[Mapping[str, int]] = None,
                 transform: Optional[Callable] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 mpp: Optional[float] = None, downsample: Optional[float] = None, balance: Optional[float] = None,
                 epoch_size: Optional[int] = None, tissue_level: Optional[int] = None,
                 transforms: Optional[Callable] = None, seed: int = 0, max_tiles: Optional[int] = None,
                 max_tiles_tumour: Optional[float] = 0.5, level0_mpp: Optional[float] = None) -> None:
        _check_options(mode, tile_size, stride, seed, balance, max_tiles, max_tiles_tumour, level, mpp, downsample,
                       level0_mpp)
        self.slides = [Path(s) for s in slides]
        if not self.slides:
            raise ValueError("CamelyonTiles: empty slide list")
        self.mode, self.tile_size = mode, int(tile_size)
        self.stride = int(stride) if stride is not None else self.tile_size
        self.label_map = dict(label_map) if label_map is not None else None
        self.transform = transform if transform is not None else transforms
        self.classes = self.classes_for(mode)
        loaded = [_load_annotations(e) for e in _align_annotations(self.slides, annotations)]
        self.annotations: List[Optional[List[Annotation]]] = [a for a, _ in loaded]
        for path, (anns, xml) in zip(self.slides, loaded):  # an unknown group fails here, naming its XML
            annotation_labels(anns or [], self.label_map, source=str(xml or path))
        cache = Path(cache_dir) if cache_dir is not None else None
        for path in self.slides:  # fail before scanning any slide
            if not path.is_file():
                raise FileNotFoundError(f"{path}: slide not found (expected a whole-slide image file: .tif, .svs, ...)")
        self.geometries: List[TileGeometry] = []
        cols: Dict[str, List[np.ndarray]] = {k: [] for k in _COLUMNS}
        for k, (path, (anns, xml)) in enumerate(zip(self.slides, loaded)):
            with open_slide(path) as s:
                geo = tile_geometry(s, level, mpp, downsample, level0_mpp, source=str(path))
            idx = index_slide(path, anns, geo.level, self.tile_size, self.stride, float(min_tissue), self.label_map,
                              cache, xml, tissue_level, geo.scale)
            self.geometries.append(geo)
            n = len(idx["x"])
            for name, v in (("slide_index", np.full(n, k, np.int32)), ("x", idx["x"]), ("y", idx["y"]),
                            ("col", idx["col"]), ("row", idx["row"]), ("tissue", idx["tissue"]),
                            ("tumour", idx["tumour"]), ("label", idx["centre"].astype(np.int8))):
                cols[name].append(np.asarray(v))
        self.read_sizes = [g.read_size(self.tile_size) for g in self.geometries]
        table = TileTable([str(p) for p in self.slides], self.geometries, self.tile_size,
                          {k: np.concatenate(v) for k, v in cols.items()})
        self.num_index_tiles = len(table)
        self.num_index_tumour_tiles = int((table.columns["tumour"] > 0).sum())
        self.max_tiles = None if max_tiles is None else int(max_tiles)
        self.max_tiles_tumour = None if max_tiles_tumour is None else float(max_tiles_tumour)
        self.seed, self.epoch = int(seed), None
        if self.max_tiles is not None:
            table = table.select(spread_subset(table.columns["slide_index"], self._positive_column(table),
                                               self.max_tiles, self.max_tiles_tumour, self.seed))
        self.tiles = table
        self.balance = None if balance is None else float(balance)
        self.epoch_size = int(epoch_size) if epoch_size else len(self.tiles)
        pos = self._positive_column(self.tiles)
        self._pools = (np.flatnonzero(pos), np.flatnonzero(~pos))
        self._handles: Dict[int, Any] = {}
        self._owner: Any = None

    # --------------------------------------------------------------------------------------- resolution
    @property
    def levels(self) -> List[int]:
        """The level read of every slide."""
        return [g.level for g in self.geometries]

    @property
    def level(self) -> int:
        """The level read of the first slide."""
        return self.geometries[0].level

    @property
    def downsamples(self) -> List[float]:
        """The downsample of every slide's level read."""
        return [g.downsample for g in self.geometries]

    @property
    def tile_downsamples(self) -> List[float]:
        """Level-0 pixels per tile pixel of every slide (its level's downsample x the resampling scale)."""
        return [g.downsample * r / self.tile_size for g, r in zip(self.geometries, self.read_sizes)]

    @property
    def mpps(self) -> List[Optional[float]]:
        """Microns per pixel of every slide's tiles (None where the slide records none)."""
        return [g.mpp for g in self.geometries]

    # --------------------------------------------------------------------------------------- helpers
    def _positive_column(self, table: TileTable) -> np.ndarray:
        c = table.columns
        return c["label"].astype(bool) if self.mode == "classify" else c["tumour"] > 0

    def _positive(self, t: Mapping[str, Any]) -> bool:
        return bool(t["label"]) if self.mode == "classify" else t["tumour"] > 0

    def positive_tiles(self) -> np.ndarray:
        """bool ``[len(tiles)]``: tumour tiles (``tumour > 0``; in classify mode the tile label)."""
        return self._positive_column(self.tiles)

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
        """``uint8 [s, s, 3]`` RGB of tile ``i`` (index into ``tiles``): ``tile_size * scale`` level pixels,
        resized to ``tile_size`` when the slide is resampled."""
        c = self.tiles.columns
        k = int(c["slide_index"][i])
        return read_tile_rgb(self._handle(k), (int(c["x"][i]), int(c["y"][i])), self.geometries[k].level,
                             self.read_sizes[k], self.tile_size)

    def tile_mask(self, i: int) -> np.ndarray:
        """``uint8 [s, s]`` label mask of tile ``i`` at the tile's resolution."""
        c = self.tiles.columns
        k = int(c["slide_index"][i])
        anns = self.annotations[k]
        if not anns:
            return np.zeros((self.tile_size, self.tile_size), np.uint8)
        return rasterize(anns, (int(c["x"][i]), int(c["y"][i])), (self.tile_size, self.tile_size),
                         self.tile_downsamples[k], self.label_map)

    def __getitem__(self, i: int):
        if self.balance is not None:
            if not 0 <= i < self.epoch_size:
                raise IndexError(i)
            i = self._balanced(i)
        elif not 0 <= i < len(self.tiles):
            raise IndexError(i)
        image = torch.from_numpy(self.read_tile(i)).permute(2, 0, 1).float().div_(255.0)
        if self.mode == "segment":
            target = torch.from_numpy(self.tile_mask(i).astype(np.int64))
            return self.transform(image, target) if self.transform is not None else (image, target)
        target = int(self.tiles.columns["label"][i])
        return (self.transform(image) if self.transform is not None else image), target
