"""ASAP XML parsing, rasterisation against hand-computed masks, and the slide-level metrics (FROC, slide AUC)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pce.datasets.camelyon import Annotation, rasterize, read_asap_xml, write_asap_xml
from pce.datasets.camelyon.metrics import camelyon_froc, evaluation_mask, heatmap_detections, slide_auc

XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="20" Y="20" />
        <Coordinate Order="0" X="1500,25" Y="10" />
        <Coordinate Order="1" X="30" Y="10,5" />
      </Coordinates>
    </Annotation>
    <Annotation Name="R" Type="Rectangle" PartOfGroup="_1"><Coordinates>
      <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="4" Y="0" />
      <Coordinate Order="2" X="4" Y="4" /><Coordinate Order="3" X="0" Y="4" /></Coordinates></Annotation>
    <Annotation Name="S" Type="Spline" PartOfGroup="Tumor"><Coordinates>
      <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="5" Y="0" /><Coordinate Order="2" X="0" Y="5" />
    </Coordinates></Annotation>
    <Annotation Name="hole" Type="Polygon" PartOfGroup="_2"><Coordinates>
      <Coordinate Order="0" X="1" Y="1" /><Coordinate Order="1" X="2" Y="1" /><Coordinate Order="2" X="2" Y="2" />
    </Coordinates></Annotation>
    <Annotation Name="d" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="3" Y="3" />
    </Coordinates></Annotation>
    <Annotation Name="ps" Type="PointSet" PartOfGroup="metastases"><Coordinates>
      <Coordinate Order="0" X="1" Y="2" /><Coordinate Order="1" X="3" Y="4" /></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def _write(tmp_path: Path, text: str, name: str = "a.xml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_parser_groups_types_order_and_decimal_commas(tmp_path: Path):
    anns = read_asap_xml(_write(tmp_path, XML))
    assert [a.name for a in anns] == ["Annotation 0", "R", "S", "hole", "d", "ps"]
    assert [a.group for a in anns] == ["_0", "_1", "Tumor", "_2", "_0", "metastases"]
    assert [a.kind for a in anns] == ["polygon", "polygon", "polygon", "polygon", "point", "point"]
    # sorted by Order, decimal commas read as points
    np.testing.assert_array_equal(anns[0].coords, [[1500.25, 10.0], [30.0, 10.5], [20.0, 20.0]])
    assert anns[0].coords.dtype == np.float64 and anns[4].coords.shape == (1, 2)
    # write -> read round trip
    back = read_asap_xml(write_asap_xml(tmp_path / "rt.xml", anns))
    assert [(a.name, a.group, a.kind) for a in back] == [(a.name, a.group, a.kind) for a in anns]
    np.testing.assert_allclose(back[0].coords, anns[0].coords)


@pytest.mark.parametrize("text, needle", [
    (XML[: len(XML) // 2], "malformed or truncated"),
    (XML.replace('X="30"', ""), "'Annotation 0': a Coordinate has no X attribute"),
    (XML.replace('Type="Spline"', 'Type="Ellipse"'), "'S': unknown Type 'Ellipse'"),
    (XML.replace('Y="20" />', 'Y="abc" />'), "'Annotation 0': Y='abc' is not a number"),
    ("<Annotations/>", "root element <Annotations>"),
])
def test_parser_errors_name_file_and_annotation(tmp_path: Path, text: str, needle: str):
    p = _write(tmp_path, text, "bad_slide.xml")
    with pytest.raises(ValueError) as e:
        read_asap_xml(p)
    assert str(p) in str(e.value) and needle in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.xml"):
        read_asap_xml(tmp_path / "missing.xml")


def _poly(coords, group="_0", name="p"):
    return Annotation(name, group, "polygon", np.asarray(coords, np.float64))


def test_rasterize_hand_computed_with_exclusion_painted_last():
    # tumour square [2, 7) x [1, 6) level-0 pixels; an exclusion [3, 5) x [2, 4) listed first: painted last anyway
    anns = [_poly([[3, 2], [5, 2], [5, 4], [3, 4]], "_2", "hole"), _poly([[2, 1], [7, 1], [7, 6], [2, 6]])]
    expected = np.zeros((8, 9), np.uint8)
    expected[1:6, 2:7] = 1
    expected[2:4, 3:5] = 0
    np.testing.assert_array_equal(rasterize(anns, (0, 0), (9, 8)), expected)
    # offset box at downsample 2: mask pixel (c, r) samples level-0 (1 + 2c + 1, 0 + 2r + 1)
    m = rasterize(anns, (1, 0), (4, 4), downsample=2.0)
    xs, ys = 1 + 2 * np.arange(4) + 1.0, 2 * np.arange(4) + 1.0
    # half-open like pixel coverage: a centre on a left / top edge is inside, on a right / bottom edge outside
    inside = ((xs[None] >= 2) & (xs[None] < 7) & (ys[:, None] >= 1) & (ys[:, None] < 6)
              & ~((xs[None] >= 3) & (xs[None] < 5) & (ys[:, None] >= 2) & (ys[:, None] < 4)))
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(m, inside.astype(np.uint8))


def test_rasterize_triangle_points_and_label_map():
    tri = _poly([[0, 0], [8, 0], [0, 8]])
    c, r = np.meshgrid(np.arange(10), np.arange(10))
    expected = ((c + 0.5) + (r + 0.5) < 8).astype(np.uint8)  # pixel centre strictly inside x + y < 8
    dot = Annotation("d", "_0", "point", np.array([[5.0, 5.0]]))
    np.testing.assert_array_equal(rasterize([tri, dot], (0, 0), (10, 10)), expected)
    np.testing.assert_array_equal(rasterize([_poly(tri.coords, "metastases")], (0, 0), (10, 10)), expected)
    assert rasterize([tri], (0, 0), (10, 10), label_map={"_0": 3}).max() == 3
    with pytest.raises(ValueError, match="group 'Lymph'.*not in the label map"):
        rasterize([_poly(tri.coords, "Lymph")], (0, 0), (10, 10))


@pytest.mark.parametrize("d", [2, 4, 8])
def test_rasterize_downsampled_is_level0_pooled_within_the_perimeter(d: int):
    rng = np.random.default_rng(d)
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    rad = 50 + 15 * np.sin(3 * t + rng.uniform(0, 6))
    blob = _poly(np.stack([100 + rad * np.cos(t), 90 + rad * np.sin(t)], 1))
    full = rasterize([blob], (0, 0), (200, 192)).astype(np.float64)
    pooled = full.reshape(192 // d, d, 200 // d, d).mean(axis=(1, 3))
    small = rasterize([blob], (0, 0), (200 // d, 192 // d), downsample=d)
    pure = (pooled == 0) | (pooled == 1)
    np.testing.assert_array_equal(small[pure], pooled[pure])   # identical wherever the outline does not pass
    assert (~pure).sum() < 0.5 * pure.sum() and abs(small.mean() - pooled.mean()) < 0.02


def test_evaluation_mask_itc_and_froc_against_monai_on_hand_listed_detections():
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    mask = np.zeros((200, 200), bool)
    mask[20:80, 20:80] = True            # lesion 1: 60 px = 240 um at 4 um/px (+ 75 um dilation): > 275 um
    mask[150:190, 120:190] = True        # lesion 2
    mask[120:122, 10:12] = True          # an isolated tumour cell cluster (ITC): 8 um (+ dilation) < 275 um
    labels, itc = evaluation_mask(mask, um_per_px=4.0)
    assert labels.max() == 3 and len(itc) == 1 and labels[121, 11] == itc[0]
    prob = np.zeros((200, 200))
    prob[40:45, 40:45] = 0.9             # TP on lesion 1
    prob[5:8, 150:160] = 0.8             # FP (glass)
    prob[170, 150] = 0.6                 # TP on lesion 2
    prob[121, 10] = 0.95                 # on the ITC: ignored
    p, ys, xs = heatmap_detections(prob, 0.5)
    assert sorted(p.tolist()) == [0.6, 0.8, 0.9, 0.95]
    second = np.zeros((50, 50))
    second[10, 10] = 0.7                 # FP on a normal slide
    res = camelyon_froc([prob, second], [mask, None], [4.0, 4.0])
    # by hand: FPs 0.8 and 0.7; per-label TP probabilities as the challenge code lists them (label 2 = the ITC: 0)
    fps, sens = compute_froc_curve_data(np.array([0.8, 0.7]), np.array([0.9, 0.0, 0.6]), 2, 2)
    assert res["num_lesions"] == 2 and res["FROC"] == pytest.approx(compute_froc_score(fps, sens))
    # thresholds 0.9 / 0.8 / 0.7 / 0.6: (FP per slide, sensitivity) = (0, .5) (.5, .5) (1, .5) (1, 1)
    assert res["FROC"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 1 + 1) / 6)
    assert res["sensitivity_at"]["8"] == 1.0 and res["sensitivity_at"]["0.25"] == 0.5
    assert slide_auc([0.9, 0.7, 0.2], [1, 0, 0]) == 1.0 and np.isnan(slide_auc([0.5], [1]))
