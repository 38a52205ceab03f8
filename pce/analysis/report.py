"""One self-contained HTML page of a run: no network, every image inlined as a base64 PNG.

:func:`build_report` takes the sections (plain numbers and PNG files) and writes the page; a small script
marks ``<body data-images="all">`` once every image has loaded (``broken`` otherwise), so a headless browser
can check the page rendered.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["read_metrics", "img_tag", "table", "build_report", "experts_section", "experts_markdown"]

STYLE = """body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;margin-top:28px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f0f0f0}img{max-width:100%;margin:4px;border:1px solid #eee}.note{color:#555;font-size:13px}
.grid{display:flex;flex-wrap:wrap;align-items:flex-start}"""

SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok === imgs.length ? 'all' : 'broken');
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (unreadable lines skipped)."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def img_tag(path: Path, alt: str = "") -> str:
    """``<img>`` with the PNG at ``path`` inlined."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt or Path(path).stem)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if v is None:
        return "-"
    return html.escape(str(v))


def table(rows: Sequence[Sequence[Any]], header: Optional[Sequence[str]] = None) -> str:
    """An HTML table of ``rows`` (floats with 4 decimals)."""
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def metric_tables(results: Mapping[str, Any]) -> str:
    """Scalar metrics as one table, every per-class dict (``{class: value}``) as another."""
    scalars = [(k, v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    parts = [table(scalars, ["metric", "value"])] if scalars else []
    for k, v in results.items():
        if isinstance(v, Mapping) and v and all(isinstance(x, (int, float)) or x is None for x in v.values()):
            parts.append(f"<h3>{html.escape(k)}</h3>" + table(list(v.items()), ["class", k]))
    return "".join(parts)


def routing_table(stats: Mapping[str, Dict[str, Any]]) -> str:
    """One row per layer: entropy, usage entropy, imbalance, collapsed experts and the NMIs with baselines."""
    rows = []
    for layer, s in stats.items():
        c, p = s.get("nmi_class") or {}, s.get("nmi_position") or {}
        rows.append([layer, s["num_experts"], f"{s['grid'][0]}x{s['grid'][1]}", s["entropy"], s["usage_entropy"],
                     s["imbalance"], ", ".join(map(str, s["collapsed_experts"])) or "none", s["dropped_rate"],
                     c.get("nmi"), c.get("baseline"), p.get("nmi"), p.get("baseline")])
    return table(rows, ["layer", "E", "grid", "entropy", "usage entropy", "imbalance", "collapsed", "dropped",
                        "NMI class", "shuffled", "NMI position", "shuffled"])


EXPERTS_NOTE = ("Do the experts differ, and does the routing matter? Weight cosine: pairwise cosine of the experts' "
                "flattened convolution kernels (lowest and mean pair). Output cosine / distance: every expert run on "
                "the same patches (the layer's inputs), mean cosine and relative L2 distance of their outputs. Causal "
                "tests: the model's output with every patch forced to one expert, and with the routing shuffled "
                "across the patches of a batch, against the routed output (relative change, top-1 agreement, and the "
                "task metric when measured). Experts that are copies give cosines of 1, distances of 0 and no change "
                "under either test: such a layer does not route, whatever its maps show.")


def _diversity_rows(diversity: Mapping[str, Dict[str, Any]]) -> List[List[Any]]:
    return [[layer, d["num_experts"], d.get("weight_cosine_min"), d.get("weight_cosine_mean"),
             d.get("output_cosine_min"), d.get("output_cosine_mean"), d.get("output_rel_l2_mean"), d.get("tokens")]
            for layer, d in diversity.items()]


_DIVERSITY_HEADER = ["layer", "E", "weight cos min", "weight cos mean", "output cos min", "output cos mean",
                     "output rel L2 mean", "tokens"]


def _causal_rows(causal: Sequence[Mapping[str, Any]]) -> Tuple[List[List[Any]], List[str]]:
    extra = sorted({k for r in causal for k in r} - {"intervention", "layers", "rel_change", "top1_agreement",
                                                      "max_abs_change"})
    rows = [[r["intervention"], r["layers"], r.get("rel_change"), r.get("top1_agreement")] + [r.get(k) for k in extra]
            for r in causal]
    return rows, ["intervention", "layers changed", "relative change", "top-1 agreement"] + extra


def experts_section(analysis: Mapping[str, Any]) -> Tuple[str, str, List[Path]]:
    """The report section of :func:`pce.analysis.runner.expert_analysis`: ``(heading, html, [])``."""
    rows, header = _causal_rows(analysis["causal"])
    text = (f"<p class='note'>{html.escape(EXPERTS_NOTE)}</p><h3>Expert diversity</h3>"
            + table(_diversity_rows(analysis["diversity"]), _DIVERSITY_HEADER)
            + "<h3>Causal tests</h3>" + table(rows, header))
    return "Experts: diversity and causal tests", text, []


def experts_markdown(analysis: Mapping[str, Any]) -> str:
    """The same two tables as Markdown (for a results page or a study's notes)."""
    def md(rows: List[List[Any]], header: List[str]) -> str:
        cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])

    rows, header = _causal_rows(analysis["causal"])
    return (f"{EXPERTS_NOTE}\n\n" + md(_diversity_rows(analysis["diversity"]), _DIVERSITY_HEADER) + "\n\n"
            + md(rows, header) + "\n")


def build_report(path: Path, title: str, sections: Iterable[Tuple[str, str, List[Path]]]) -> Path:
    """Write the page: ``sections`` are ``(heading, html text, [PNG files])``."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, text, images in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>{text}<div class='grid'>"
                    + "".join(img_tag(p) for p in images) + "</div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body data-images='pending'>{''.join(body)}{SCRIPT}</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
