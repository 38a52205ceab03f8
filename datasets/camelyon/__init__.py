"""Whole-slide pathology (Camelyon16/17): ASAP annotations, tissue masks, tile datasets at a level or a resolution
in microns per pixel, the Camelyon folder layouts with a validation split of the training slides, block reads for
whole-slide inference, generated slides.

    from pce.datasets.camelyon import read_asap_xml, rasterize, tissue_mask, CamelyonTiles

Slides are read with openslide-python + openslide-bin; see ``docs/CAMELYON.md``.
"""
from .annotations import DEFAULT_LABEL_MAP, Annotation, annotation_labels, rasterize, read_asap_xml, write_asap_xml
from .slide import (TileGeometry, choose_level, open_slide, read_level, read_rgb, read_tile_rgb, slide_mpp,
                    tile_geometry, tissue_mask)
from .index import box_fractions, centre_slice
from .tiles import CamelyonTiles, TileTable, spread_subset
from .layout_table import CAMELYON16_LAYOUT, LAYOUTS, SlideEntry
from .slide_labels import read_slide_labels
from .camelyon17 import camelyon17_slides
from .layout import find_camelyon16_slides, layout_slides
from .splits import SPLIT_FILE, holdout_split, write_split_records
from .camelyon16 import Camelyon16Tiles
from .sampler import BalancedTileSampler
from .blocks import TileBlocks
from .transforms import TileTransform
from .synthetic import (ensure_demo_camelyon, make_demo_camelyon, make_demo_camelyon17, make_synthetic_slide,
                        write_pyramid_tiff)

__all__ = [
    "Annotation", "read_asap_xml", "write_asap_xml", "rasterize", "DEFAULT_LABEL_MAP", "annotation_labels",
    "open_slide", "slide_mpp", "choose_level", "read_level", "tile_geometry", "TileGeometry", "read_rgb",
    "read_tile_rgb", "tissue_mask", "box_fractions", "centre_slice",
    "CamelyonTiles", "TileTable", "spread_subset", "TileBlocks", "Camelyon16Tiles", "BalancedTileSampler",
    "find_camelyon16_slides", "CAMELYON16_LAYOUT", "LAYOUTS", "SPLIT_FILE", "SlideEntry", "layout_slides",
    "holdout_split", "read_slide_labels", "camelyon17_slides", "write_split_records",
    "TileTransform", "make_synthetic_slide", "write_pyramid_tiff", "make_demo_camelyon", "make_demo_camelyon17",
    "ensure_demo_camelyon",
]
