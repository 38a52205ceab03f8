"""Whole-slide pathology (Camelyon16/17): ASAP annotations, tissue masks, tile datasets, generated slides.

    from pce.datasets.camelyon import read_asap_xml, rasterize, tissue_mask, CamelyonTiles

Slides are read with openslide-python + openslide-bin; see ``docs/CAMELYON.md``.
"""
from .annotations import DEFAULT_LABEL_MAP, Annotation, annotation_labels, rasterize, read_asap_xml, write_asap_xml
from .slide import choose_level, open_slide, read_rgb, slide_mpp, tissue_mask
from .index import box_fractions, centre_slice
from .tiles import CamelyonTiles
from .layout import CAMELYON16_LAYOUT, BalancedTileSampler, Camelyon16Tiles, find_camelyon16_slides
from .transforms import TileTransform
from .synthetic import ensure_demo_camelyon, make_demo_camelyon, make_synthetic_slide, write_pyramid_tiff

__all__ = [
    "Annotation", "read_asap_xml", "write_asap_xml", "rasterize", "DEFAULT_LABEL_MAP", "annotation_labels",
    "open_slide", "slide_mpp", "choose_level", "read_rgb", "tissue_mask", "box_fractions", "centre_slice",
    "CamelyonTiles", "Camelyon16Tiles", "BalancedTileSampler", "find_camelyon16_slides", "CAMELYON16_LAYOUT",
    "TileTransform", "make_synthetic_slide", "write_pyramid_tiff", "make_demo_camelyon", "ensure_demo_camelyon",
]
