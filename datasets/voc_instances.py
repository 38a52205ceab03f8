"""Per-object masks of PASCAL VOC: ``SegmentationObject/{id}.png`` read as one binary mask per annotated object.

In VOC's ``SegmentationObject`` PNGs (palette or 8-bit index) pixel value ``k`` (1, 2, ...) marks the ``k``-th
``<object>`` of the image's ``Annotations/{id}.xml`` (document order), 0 the background and 255 the void band
around outlines. :func:`load_instance_masks` returns ``uint8 [N, H, W]`` (1 on object ``k``'s pixels; void and
background 0, as COCO / torchvision masks), checking the values against the number of objects.
:class:`~pce.datasets.voc.VOCDetection` uses it with ``masks=True``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .voc_format import IGNORE_INDEX
from .voc_images import load_index_mask

__all__ = ["load_instance_masks"]


def load_instance_masks(path: str | os.PathLike, num_objects: int, size: tuple[int, int]) -> np.ndarray:
    """Object masks ``uint8 [num_objects, H, W]`` from the instance PNG ``path``; ``size`` is the image's
    ``(H, W)``. ``FileNotFoundError`` / ``ValueError`` name ``path`` for a missing file, another size, or a value
    that is no object of the annotation (``> num_objects`` and not 255)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: instance mask not found (expected the SegmentationObject PNG of every "
                                f"image when masks=True; ImageSets/Segmentation lists the images that have one)")
    inst = load_index_mask(path, num_objects + 1, IGNORE_INDEX)
    if inst.shape[:2] != tuple(size):
        raise ValueError(f"{path}: instance mask is {inst.shape[1]}x{inst.shape[0]} (WxH) but the image is "
                         f"{size[1]}x{size[0]} (expected the image's size)")
    ids = np.arange(1, num_objects + 1, dtype=inst.dtype).reshape(-1, 1, 1)
    return (inst[None] == ids).astype(np.uint8)
