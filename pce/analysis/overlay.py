"""The routing overlay figure: per routed layer, the image with its expert map over it at full resolution, the
expert map alone, and the routing entropy, with a legend of the experts present.

Expert colours (:func:`expert_palette`) are colour-blind safe: the eight Okabe-Ito colours (orange, sky blue,
bluish green, yellow, blue, vermillion, reddish purple, black; black last, as it vanishes on dark images) for up
to 8 experts. With more experts, matplotlib's ``tab20`` colours (not colour-blind safe on their own) plus a hatch
per expert (:func:`expert_hatch`), and the expert index printed in every patch, tell them apart. The colours never
have to be told from the image: the middle panel shows the map alone, opaque; the overlay draws the patch borders
as white lines with a black halo and prints each patch's expert index (white text, black outline), so it stays
readable on any image.

>>> from pce.analysis.plots import routing_figure      # one row per layer drawn by draw_layer_row
>>> routing_figure(image, maps, 0, "r.png", title="val_0003", true_label="cat", predicted="dog (0.81)")
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as pe  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

__all__ = ["OKABE_ITO", "expert_palette", "expert_hatch", "cell_edges", "expert_pixels", "expert_rgba",
           "expert_shares", "legend_handles", "draw_layer_row", "HALO"]

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
HATCHES = ("", "//", "\\\\", "xx", "..", "++", "oo", "--")
HALO = [pe.Stroke(linewidth=1.8, foreground="black"), pe.Normal()]  # a white line / text with a black rim
_LABEL_MAX_CELLS = 256  # expert indices printed in the patches up to a 16 x 16 grid


def expert_palette(n: int) -> np.ndarray:
    """``[n, 4]`` RGBA colours of experts ``0..n-1``: Okabe-Ito for ``n <= 8``, else ``tab20`` (cycled)."""
    if n <= len(OKABE_ITO):
        return np.array([to_rgba(c) for c in OKABE_ITO[:n]]).reshape(n, 4)
    cmap = plt.get_cmap("tab20")
    return np.array([cmap(i % cmap.N) for i in range(n)])


def expert_hatch(e: int, n: int) -> Optional[str]:
    """The hatch of expert ``e`` of ``n``: ``None`` with the Okabe-Ito colours (``n <= 8``), else a pattern that,
    with the ``tab20`` colour, tells neighbouring experts apart (``None`` for the first 20)."""
    if n <= len(OKABE_ITO):
        return None
    return HATCHES[(e // 20 + e % 2 * 3) % len(HATCHES)] or None


def cell_edges(m: Any, H: int, W: int) -> Tuple[List[int], List[int]]:
    """``(row edges, column edges)`` (``gh + 1`` / ``gw + 1`` integers from 0 to ``H`` / ``W``) of layer map
    ``m``'s cells on an ``H x W`` picture: its borders on the image
    (:meth:`~pce.analysis.maps.LayerMap.image_borders`) scaled to the picture, else the grid spread evenly
    (overlapping patches, no known scale)."""
    borders = m.image_borders()
    gh, gw = m.grid
    if borders is None:
        return [round(r * H / gh) for r in range(gh + 1)], [round(c * W / gw) for c in range(gw + 1)]
    rows, cols = borders
    return ([min(round(r * H / rows[-1]), H) for r in rows[:-1]] + [H],
            [min(round(c * W / cols[-1]), W) for c in cols[:-1]] + [W])


def expert_pixels(cells: np.ndarray, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
    """Per-cell values ``[gh, gw, ...]`` repeated over each cell's pixels (nearest upsampling): ``[H, W, ...]``."""
    return np.repeat(np.repeat(cells, np.diff(rows), axis=0), np.diff(cols), axis=1)


def expert_rgba(expert: np.ndarray, colors: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``[H, W]`` expert ids (``-1``: dropped) -> ``[H, W, 4]`` colours of opacity ``alpha`` (dropped: clear)."""
    rgba = np.zeros(expert.shape + (4,))
    used = expert >= 0
    rgba[used] = colors[expert[used]]
    rgba[used, 3] = alpha
    return rgba


def expert_shares(cells: np.ndarray) -> List[Tuple[int, float]]:
    """``[(expert, share of the patches)]`` of the experts present in ``cells [gh, gw]`` (dropped: not counted
    as an expert, but in the total), by expert index."""
    ids, counts = np.unique(cells[cells >= 0], return_counts=True)
    return [(int(e), float(c) / cells.size) for e, c in zip(ids, counts)]


def legend_handles(cells: np.ndarray, colors: np.ndarray) -> List[Patch]:
    """One legend entry per expert present in ``cells``: ``"expert e: 42% of patches"`` (and the dropped ones)."""
    n = len(colors)
    out = [Patch(facecolor=colors[e], edgecolor="black", hatch=expert_hatch(e, n),
                 label=f"expert {e}: {share:.0%} of patches") for e, share in expert_shares(cells)]
    dropped = float((cells < 0).mean())
    if dropped > 0:
        out.append(Patch(facecolor="none", edgecolor="black", label=f"dropped: {dropped:.0%}"))
    return out


def _borders(ax: Any, rows: Sequence[int], cols: Sequence[int], halo: bool) -> None:
    """Inner patch borders as thin white lines (a black halo on the image: readable on any picture)."""
    kw = {"color": "white", "lw": 0.6, "path_effects": HALO} if halo else {"color": "white", "lw": 0.5}
    for y in rows[1:-1]:
        ax.axhline(y, **kw)
    for x in cols[1:-1]:
        ax.axvline(x, **kw)


def _cell_marks(ax: Any, cells: np.ndarray, rows: Sequence[int], cols: Sequence[int], n: int, text: bool) -> None:
    """Hatches (more than 8 experts) and, on small grids, the expert index at each patch centre."""
    for i in range(cells.shape[0]):
        for j in range(cells.shape[1]):
            e = int(cells[i, j])
            x0, y0, w, h = cols[j], rows[i], cols[j + 1] - cols[j], rows[i + 1] - rows[i]
            if e >= 0 and expert_hatch(e, n):
                ax.add_patch(Rectangle((x0, y0), w, h, fill=False, hatch=expert_hatch(e, n), lw=0,
                                       edgecolor=(0, 0, 0, 0.6)))
            if text and e >= 0 and cells.size <= _LABEL_MAX_CELLS and w > 0 and h > 0:
                ax.text(x0 + w / 2, y0 + h / 2, str(e), ha="center", va="center", color="white",
                        fontsize=max(4.0, min(9.0, 60.0 / max(cells.shape))), path_effects=HALO)


def draw_layer_row(axes: Sequence[Any], img: np.ndarray, m: Any, index: int, colors: np.ndarray, alpha: float,
                   title: str) -> Tuple[Any, np.ndarray]:
    """Fill one row ``(overlay, expert map, entropy, legend)`` of axes for image ``index`` of layer map ``m``
    over ``img [H, W, 3]``; returns the entropy image (for its colour bar) and the cells ``[gh, gw]``."""
    H, W = img.shape[:2]
    rows, cols = cell_edges(m, H, W)
    cells = m.expert[index].numpy()
    px = expert_pixels(cells, rows, cols)  # [H, W]: the expert of every picture pixel
    extent = (0, W, H, 0)
    ov, mp, en, lg = axes
    ov.imshow(img, extent=extent)
    ov.imshow(expert_rgba(px, colors, alpha), extent=extent, interpolation="nearest")
    _borders(ov, rows, cols, halo=True)
    _cell_marks(ov, cells, rows, cols, len(colors), text=True)
    ov.set_title("experts over the image", fontsize=7)
    ov.set_ylabel(title, fontsize=7)  # the layer: beside the row, where a long name fits
    mp.imshow(expert_rgba(px, colors), extent=extent, interpolation="nearest")
    mp.hlines(rows[1:-1], 0, W, colors="white", lw=0.5)  # the same borders (hlines: one call per panel)
    mp.vlines(cols[1:-1], 0, H, colors="white", lw=0.5)
    _cell_marks(mp, cells, rows, cols, len(colors), text=False)
    mp.set_title(f"expert map ({m.grid[0]}x{m.grid[1]} patches)", fontsize=7)
    ent = expert_pixels(m.entropy[index].numpy(), rows, cols)
    im = en.imshow(ent, vmin=0, vmax=float(np.log(max(m.num_experts, 2))), cmap="viridis", extent=extent,
                   interpolation="nearest")
    en.set_title("routing entropy (nats)", fontsize=7)
    for ax in (ov, mp, en):
        ax.set_xticks([])
        ax.set_yticks([])
    lg.axis("off")
    lg.legend(handles=legend_handles(cells, colors), loc="center left", fontsize=6, frameon=False,
              title="experts present", title_fontsize=6)
    return im, cells
