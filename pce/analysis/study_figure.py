"""The figure of a placement / routing study (issue #26, ``tools/run_study.py`` writes it beside ``summary.md``):
one row per variant, its difference to the reference (the dense twin) with the 95% confidence interval where there
are seeds enough for Welch's test, coloured by what the study's expert analysis found (copies / differ / not
routed), hollow where the run was stopped at half its schedule.

>>> rows = [StudyRow("pce_head", +0.0001, -0.0139, +0.0141, verdict="copies 5/5", seeds=5),
...         StudyRow("condconv_head", +0.0065, -0.0057, +0.0186, seeds=5)]
>>> study_figure(rows, "summary.png", metric="final mIoU", reference="dense")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from pce.analysis.overlay import OKABE_ITO
from pce.analysis.plots import _save, plt

__all__ = ["StudyRow", "study_figure", "verdict_class", "VERDICT_COLORS"]

# Okabe-Ito (colour-blind safe), one colour per kind of expert verdict
VERDICT_COLORS = {"copies": OKABE_ITO[0], "differ": OKABE_ITO[4], "inert": OKABE_ITO[1], "mixed": OKABE_ITO[6],
                  "not routed": "#555555", "not analysed": OKABE_ITO[2]}
_LEGEND = {"copies": "experts are copies", "differ": "experts differ", "inert": "differ, metric unchanged",
           "mixed": "verdicts differ across seeds", "not routed": "no patch routing (dense, CondConv)",
           "not analysed": "experts not analysed"}


@dataclass(frozen=True)
class StudyRow:
    """One variant: ``diff`` = its metric minus the reference's; ``low`` / ``high`` the 95% interval of that
    difference (``None``: one seed, a dot only); ``verdict`` the study's expert verdict (``"-"``: no routed layer,
    ``"copies 2/5, differ 3/5"`` over seeds); ``stopped``: ended at half its schedule."""

    name: str
    diff: float
    low: Optional[float] = None
    high: Optional[float] = None
    verdict: str = "-"
    stopped: bool = False
    seeds: int = 1


def verdict_class(verdict: str) -> str:
    """``copies`` / ``differ`` / ``inert`` (differ, metric unchanged) / ``mixed`` (seeds disagree) / ``not routed``
    / ``not analysed`` of a study verdict cell: one run's verdict or ``verdict_counts``' ``"copies 2/5, differ 3/5"``."""
    v = (verdict or "-").strip()
    if v in ("-", ""):
        return "not routed"
    if v.startswith("not analysed") or v == "?":
        return "not analysed"
    inert = v.count("metric unchanged")
    differ, copies = v.count("differ") - inert, "copies" in v
    if copies + bool(differ) + bool(inert) > 1:
        return "mixed"
    return "copies" if copies else ("inert" if inert else ("differ" if differ else "not analysed"))


def x_range(rows: Sequence[StudyRow]) -> Tuple[float, float]:
    """The x limits: every row's difference and interval and 0, padded by 8%; when runs stopped at half lie
    further out than the other rows' own span, the span of the other rows (those runs are drawn as arrow heads at
    the edge), so one collapsed run does not squash every other difference into a line."""
    def span(rs):
        xs = [0.0] + [v for r in rs for v in (r.diff, r.low, r.high) if v is not None]
        return min(xs), max(xs)

    lo, hi = span(rows)
    kept = [r for r in rows if not r.stopped]
    if kept and len(kept) < len(rows):
        klo, khi = span(kept)
        width = max(khi - klo, 1e-6)
        lo = klo - 0.5 * width if lo < klo - width else lo
        hi = khi + 0.5 * width if hi > khi + width else hi
    pad = 0.08 * max(hi - lo, 1e-6)
    return lo - pad, hi + pad


def study_figure(rows: Sequence[StudyRow], path: Union[str, Path], *, metric: str, reference: str, title: str = "",
                 dpi: Optional[int] = None) -> Path:
    """Draw ``rows`` (best difference at the top) against a zero line that is the reference and write the figure
    to ``path`` atomically (PNG, or PDF / SVG by the suffix). Each row is labelled with its difference, its
    interval and its seeds on the right, so no value hides behind a marker. Raises ``ValueError`` without rows."""
    if not rows:
        raise ValueError("study_figure: no variant to draw")
    order = sorted(rows, key=lambda r: r.diff)  # matplotlib draws y = 0 at the bottom: best on top
    lo, hi = x_range(order)
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.36 * len(order)))
    seen = []
    for y, row in enumerate(order):
        kind = verdict_class(row.verdict)
        colour = VERDICT_COLORS[kind]
        if row.low is not None and row.high is not None:
            ax.plot([max(row.low, lo), min(row.high, hi)], [y, y], color=colour, linewidth=2.0, solid_capstyle="butt")
        inset = 0.03 * (hi - lo)  # an outlier sits at the edge as an arrow head; its value is in the note
        x = row.diff if lo + inset <= row.diff <= hi - inset else min(max(row.diff, lo + inset), hi - inset)
        ax.plot(x, y, marker="o" if x == row.diff else ("<" if row.diff < x else ">"), markersize=7, color=colour,
                markeredgecolor=colour, markerfacecolor="white" if row.stopped else colour, linestyle="none")
        interval = f" [{row.low:+.4f}, {row.high:+.4f}]" if row.low is not None and row.high is not None else ""
        note = f"{row.diff:+.4f}{interval}  n={row.seeds}" + ("  stopped at half" if row.stopped else "")
        ax.annotate(note, xy=(1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
        seen.append(kind)
    ax.axvline(0.0, color="black", linewidth=1.0)
    ax.set_yticks(range(len(order)), [r.name for r in order], fontsize=9)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_xlim(lo, hi)
    bars = "; bars: 95% Welch interval" if any(r.low is not None for r in order) else ""
    ax.set_xlabel(f"{metric} minus {reference} (0 = {reference}{bars})")
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    handles = [plt.Line2D([], [], marker="o", linestyle="none", color=VERDICT_COLORS[k], label=_LEGEND[k])
               for k in VERDICT_COLORS if k in seen]
    if any(r.stopped for r in order):
        handles.append(plt.Line2D([], [], marker="o", linestyle="none", color="#555555", markerfacecolor="white",
                                  label="stopped at half"))
    if any(not lo <= r.diff <= hi for r in order):
        handles.append(plt.Line2D([], [], marker="<", linestyle="none", color="#555555", markerfacecolor="white",
                                  label="beyond the axis (value on the right)"))
    below = 0.55 / (fig.get_figheight() * (fig.subplotpars.top - fig.subplotpars.bottom))  # under the x label
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -below), ncol=min(3, len(handles)),
              fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi=dpi)
