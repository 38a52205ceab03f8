"""Paper figures against hand values: the routing overlay (palette, pixel colours, legend, resolution) and the
NMI over training read from a hand-written ``metrics.jsonl`` (series, mean, min-max band, phase lines)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image

from _faults_util import load_tool
from pce.analysis import plots
from pce.analysis.maps import LayerMap
from pce.analysis.nmi_curves import nmi_band, nmi_series
from pce.analysis.report import read_metrics

# Okabe & Ito (2008), "Color Universal Design", by hand; black moved last
OKABE_ITO_HEX = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
OKABE_ITO_RGB = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                 (204, 121, 167), (0, 0, 0)]
# a 2 x 3 grid on a 16 x 24 image (cells of 8 x 8 image pixels), 4 experts: 1 and 3 unused, one patch dropped
CELLS = torch.tensor([[[0, 2, 2], [2, 0, -1]]])
ROWS, COLS = (0, 8, 16), (0, 8, 16, 24)


def hand_map() -> LayerMap:
    E = 4
    weights = torch.zeros(1, 2, 3, E)
    for (i, j), e in np.ndenumerate(CELLS[0].numpy()):
        if e >= 0:
            weights[0, i, j, e] = 1.0
    return LayerMap(expert=CELLS.clone(), entropy=torch.full((1, 2, 3), 0.3), weights=weights, grid=(2, 3),
                    patch_size=8, stride=8, map_patch_size=4, map_stride=4, feature_stride=2, map_size=(8, 12),
                    cell_rows=(0, 4, 8), cell_cols=(0, 4, 8, 12), scale=(2.0, 2.0), image_size=(16, 24))


@pytest.fixture
def saved(monkeypatch):
    """Every figure saved, with its size in inches, dpi and axes positions (after the layout) at saving."""
    real, got = matplotlib.figure.Figure.savefig, []

    def spy(self, fname, **kw):
        real(self, fname, **kw)
        got.append({"fig": self, "inches": tuple(self.get_size_inches()), "dpi": kw.get("dpi"),
                    "pos": [ax.get_position().bounds for ax in self.axes]})

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return got


def test_palette_is_okabe_ito_up_to_8_then_tab20_with_hatches():
    from matplotlib.colors import to_hex

    from pce.analysis.overlay import expert_hatch

    for n in range(1, 9):
        assert [to_hex(c).upper() for c in plots.expert_colors(n)] == OKABE_ITO_HEX[:n]
        assert all(expert_hatch(e, n) is None for e in range(n))
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    assert np.allclose(plots.expert_colors(12), [tab20(i) for i in range(12)])
    hatches = [expert_hatch(e, 12) for e in range(12)]
    assert all(hatches[e] != hatches[e + 1] for e in range(11))  # neighbours differ by hatch too


def _pixel(png: np.ndarray, bounds, x: float, y: float, W: int, H: int) -> np.ndarray:
    """The PNG pixel at data point ``(x, y)`` of an image axes at figure ``bounds`` showing ``W x H`` pixels."""
    x0, y0, w, h = bounds
    rows, cols = png.shape[:2]
    fx, fy = x0 + w * x / W, y0 + h * (1 - y / H)
    return png[int((1 - fy) * rows), int(fx * cols), :3].astype(int)


def test_overlay_colours_legend_and_resolution(tmp_path, saved):
    image = torch.full((3, 16, 24), 0.5)  # mid grey: the blend is known by hand
    path = plots.routing_figure(image, {"backbone.stages.1.layers.0": hand_map()}, 0, tmp_path / "r.png",
                                title="val_0000", true_label="cat", predicted="dog (0.81)", dpi=150)
    rec = saved[-1]
    with Image.open(path) as im:
        png = np.asarray(im.convert("RGB"))
        assert im.info["dpi"] == pytest.approx((150, 150), abs=0.03)  # PNG stores whole pixels per metre
        assert np.abs(np.subtract(im.size, np.multiply(rec["inches"], 150))).max() < 1  # whole figure, not cropped
    overlay, expert_map = rec["pos"][0], rec["pos"][1]
    for (i, j), e in np.ndenumerate(CELLS[0].numpy()):
        cx, cy = (COLS[j] + COLS[j + 1]) / 2, (ROWS[i] + ROWS[i + 1]) / 2
        got = _pixel(png, expert_map, cx, cy, 24, 16)
        want = np.array(OKABE_ITO_RGB[e]) if e >= 0 else np.array([255, 255, 255])  # dropped: clear (white page)
        assert np.abs(got - want).max() <= 2, (i, j, got, want)
        # on the image, a quarter into the cell (clear of the index label): 0.45 colour + 0.55 grey
        blend = _pixel(png, overlay, COLS[j] + 2.5, ROWS[i] + 2.5, 24, 16)
        want = 0.45 * np.array(OKABE_ITO_RGB[e]) + 0.55 * 127.5 if e >= 0 else np.full(3, 127.5)
        assert np.abs(blend - want).max() <= 3, (i, j, blend, want)
    fig = rec["fig"]
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["expert 0: 33% of patches", "expert 2: 50% of patches", "dropped: 17%"]
    box = fig.axes[3].get_legend().get_window_extent()  # beside the panels and the colour bar, inside the figure
    assert not any(box.overlaps(fig.axes[k].get_window_extent()) for k in (0, 1, 2, 4))
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y0 >= 0 and box.y1 <= fig.bbox.y1
    assert "true: cat" in fig._suptitle.get_text() and "predicted: dog (0.81)" in fig._suptitle.get_text()
    assert fig.axes[0].get_ylabel() == "stages.1.layers.0"
    # the expert index printed in every routed patch
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0", "0", "2", "2", "2"]


def test_default_dpi_and_vector_formats(tmp_path, saved):
    path = plots.routing_figure(torch.rand(3, 16, 24), {"l": hand_map()}, 0, tmp_path / "r.png")
    with Image.open(path) as im:
        assert im.info["dpi"] == pytest.approx((200, 200), abs=0.03) and plots.DPI == 200
        assert np.abs(np.subtract(im.size, np.multiply(saved[-1]["inches"], 200))).max() < 1
    assert plots.routing_figure(torch.rand(3, 16, 24), {"l": hand_map()}, 0, tmp_path / "r.pdf").read_bytes()[:4] \
        == b"%PDF"
    assert b"<svg" in plots.routing_figure(torch.rand(3, 16, 24), {"l": hand_map()}, 0, tmp_path / "r.svg"
                                           ).read_bytes()[:400]


def _train(epoch, it, **layers):
    return {"type": "train", "epoch": epoch, "iter": it, "loss": 1.0, "routing": layers}


def write_run(folder: Path, records) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + ["{not json"]  # a torn last line is skipped
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


RUN_A = [{"type": "phase", "epoch": 1, "iter": 0, "name": "shared"},
         _train(1, 10, a={"nmi_class": 0.2, "nmi_position": 0.6, "nmi_class_baseline": 0.02}),
         _train(1, 20, a={"nmi_class": 0.4, "nmi_position": 0.8, "nmi_class_baseline": 0.04}),
         {"type": "val", "epoch": 1, "iter": 20, "top1": 0.5},
         _train(2, 30, a={"nmi_class": 0.5, "nmi_position": 0.5}),
         {"type": "phase", "epoch": 3, "iter": 40, "name": "route"},
         _train(3, 50, a={"nmi_class": None, "nmi_position": 0.1})]  # class NMI not computable here
RUN_B = [{"type": "phase", "epoch": 1, "iter": 0, "name": "shared"},
         _train(1, 10, a={"nmi_class": 0.1, "nmi_position": 0.2}),
         _train(2, 30, a={"nmi_class": 0.9, "nmi_position": 0.3}),
         _train(3, 50, a={"nmi_class": 0.7, "nmi_position": 0.0})]


def test_nmi_series_and_band_equal_hand_values(tmp_path):
    a = nmi_series(read_metrics(write_run(tmp_path / "a", RUN_A) / "metrics.jsonl"))
    assert a["epochs"] == [1, 2, 3] and a["phases"] == [(1, "shared"), (3, "route")]
    assert a["layers"]["a"]["nmi_class"][:2] == pytest.approx([0.3, 0.5]) and np.isnan(a["layers"]["a"]["nmi_class"][2])
    assert a["layers"]["a"]["nmi_position"] == pytest.approx([0.7, 0.5, 0.1])
    assert a["layers"]["a"]["nmi_class_baseline"][0] == pytest.approx(0.03)
    b = nmi_series(RUN_B)
    band = nmi_band([a, b])
    cls, pos = band["layers"]["a"]["nmi_class"], band["layers"]["a"]["nmi_position"]
    assert cls["mean"] == pytest.approx([0.2, 0.7, 0.7]) and cls["n"] == [2, 2, 1]  # epoch 3: run b alone
    assert cls["min"] == pytest.approx([0.1, 0.5, 0.7]) and cls["max"] == pytest.approx([0.3, 0.9, 0.7])
    assert pos["mean"] == pytest.approx([0.45, 0.4, 0.05])
    assert pos["min"] == pytest.approx([0.2, 0.3, 0.0]) and pos["max"] == pytest.approx([0.7, 0.5, 0.1])
    with pytest.raises(ValueError, match="no routing statistics"):
        nmi_series([{"type": "val", "epoch": 1}])
    # a log written before nmi_with_baseline's fix: one expert takes every patch (a shared phase) and the batch's
    # labels are constant, logged as NMI 1.0 (scikit-learn's two constant labelings); it counts as 0
    shared = {"type": "train", "epoch": 1, "routing": {"a": {"usage": [1.0, 0.0, 0.0, 0.0], "nmi_class": 1.0,
                                                              "nmi_class_baseline": 1.0, "nmi_position": 0.0}}}
    routed = {"type": "train", "epoch": 2, "routing": {"a": {"usage": [0.5, 0.5, 0.0, 0.0], "nmi_class": 1.0}}}
    got = nmi_series([shared, routed])["layers"]["a"]
    assert got["nmi_class"] == [0.0, 1.0] and got["nmi_class_baseline"][0] == 0.0


def test_nmi_tool_draws_mean_band_and_phases(tmp_path, saved, capsys):
    from pce.engine.errors import run_cli

    tool = load_tool("analyze_routing")
    out = tmp_path / "nmi.png"
    runs = [str(write_run(tmp_path / "a", RUN_A)), str(write_run(tmp_path / "b", RUN_B))]
    args = tool.parse_args(["--runs", *runs, "--nmi-plot", str(out)])
    assert run_cli(lambda: tool.main(args)) == 0
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["runs"] == runs and got["layers"]["a"]["nmi_position"]["max"] == pytest.approx([0.7, 0.5, 0.1])
    ax = saved[-1]["fig"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert list(lines["expert vs class"].get_ydata()) == pytest.approx([0.2, 0.7, 0.7])
    assert list(lines["expert vs position"].get_ydata()) == pytest.approx([0.45, 0.4, 0.05])
    band = [c for c in ax.collections if c.get_label() == "expert vs position: min-max of 2 runs"][0]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(0.7)
    assert [ln.get_xdata()[0] for ln in ax.lines if ln.get_linestyle() == "-."] == [2.5]  # "route" starts at 3
    with Image.open(out) as im:
        assert im.info["dpi"] == pytest.approx((200, 200), abs=0.03)
    # bad input: one line naming the file
    args = tool.parse_args(["--runs", str(tmp_path / "none"), "--nmi-plot", str(tmp_path / "x.png")])
    assert run_cli(lambda: tool.main(args)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none/metrics.jsonl: no such file" in err and "Traceback" not in err
    empty = write_run(tmp_path / "empty", [{"type": "val", "epoch": 1, "top1": 0.1}])
    args = tool.parse_args(["--runs", str(empty), "--nmi-plot", str(tmp_path / "y.png")])
    assert run_cli(lambda: tool.main(args)) == 1
    assert "empty/metrics.jsonl: no routing statistics" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()


def test_class_captions_name_true_and_predicted_classes():
    from pce.tasks import get_task

    tool = load_tool("visualize_routing")
    names = ["cat", "dog", "bird"]
    logits = torch.tensor([0.0, 0.0, 2.0])
    p = float(torch.softmax(logits, 0)[2])
    assert tool.class_captions(logits, torch.tensor(1), names, True, get_task("classification")) == (
        "dog", f"bird ({p:.2f})")
    assert tool.class_captions(logits, 0, names, False, get_task("classification"))[0] is None
    mask = torch.tensor([[0, 0, 2], [2, 2, 255]])  # bird 3 pixels, cat 2, ignored 1
    pred = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert tool.class_captions(pred, mask, names, True, get_task("segmentation")) == ("bird, cat", "cat, dog")


def test_more_than_8_experts_get_hatches_in_map_and_legend(tmp_path, saved):
    from pce.analysis.overlay import expert_hatch

    m = hand_map()
    m.expert = torch.tensor([[[9, 10, 11], [8, 9, -1]]])
    m.weights = torch.zeros(1, 2, 3, 12)
    plots.routing_figure(torch.rand(3, 16, 24), {"l": m}, 0, tmp_path / "r.png")
    fig = saved[-1]["fig"]
    handles = fig.axes[3].get_legend().legend_handles
    # tab20 pairs a dark and a light shade of one hue (experts 2k, 2k + 1): the light one is hatched
    assert [h.get_hatch() for h in handles[:4]] == [None, "xx", None, "xx"]
    assert [expert_hatch(e, 12) for e in (8, 9, 10, 11)] == [None, "xx", None, "xx"]
    # each routed cell of the expert map carries its expert's hatch (a rectangle over the cell)
    hatched = sorted((r.get_x(), r.get_y(), r.get_hatch()) for r in fig.axes[1].patches if r.get_hatch())
    assert hatched == [(0, 0, "xx"), (8, 8, "xx"), (16, 0, "xx")]  # experts 9 at (0, 0) and (1, 1), 11 at (0, 2)
