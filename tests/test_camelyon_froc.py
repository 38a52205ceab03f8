"""Camelyon16 FROC on hand-built slides, against values computed by hand with the challenge's definition
(mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 false positives per slide, read off the curve of operating points)."""
from __future__ import annotations

import numpy as np
import pytest

from pce.datasets.camelyon.metrics import camelyon_froc, froc_curve

UM = 4.0  # um per pixel: a 60 px square is 240 um (+ the 75 um dilation): a lesion, not an ITC


def slide(lesion: bool = True, itc: bool = False):
    """A 200 x 200 slide: (empty probability map, tumour mask or None)."""
    mask = np.zeros((200, 200), bool)
    if lesion:
        mask[20:80, 20:80] = True
    if itc:
        mask[150:152, 150:152] = True     # 8 um: an isolated tumour cell cluster
    return np.zeros((200, 200)), (mask if mask.any() else None)


def test_all_lesions_hit_without_false_positives_is_a_perfect_froc():
    slides = [slide() for _ in range(3)]
    for (prob, _), p in zip(slides, (0.997, 0.999, 0.994)):
        prob[50, 50] = p                     # the demo case: every lesion hit, no false positive
    res = camelyon_froc([s[0] for s in slides], [s[1] for s in slides], [UM] * 3)
    assert res["num_lesions"] == 3
    assert res["FROC"] == pytest.approx(1.0)  # the reference script's quirk gives 0.667 here
    assert all(v == pytest.approx(1.0) for v in res["sensitivity_at"].values())


def test_half_the_lesions_hit():
    (p1, m1), (p2, m2) = slide(), slide()
    p1[50, 50] = 0.9                          # lesion of slide 1 hit; lesion of slide 2 missed
    res = camelyon_froc([p1, p2], [m1, m2], [UM, UM])
    assert res["num_lesions"] == 2 and res["FROC"] == pytest.approx(0.5)


def test_no_lesion_hit_and_a_false_positive_on_a_normal_slide():
    (p1, m1), (p2, m2) = slide(), slide(lesion=False)
    p2[100, 100] = 0.8                        # a false positive on the normal slide
    res = camelyon_froc([p1, p2], [m1, m2], [UM, UM])
    assert res["num_lesions"] == 1 and res["FROC"] == pytest.approx(0.0)


def test_false_positives_scoring_above_the_hit():
    (p1, m1), (p2, m2), (p3, m3) = slide(), slide(lesion=False), slide(lesion=False)
    p1[50, 50] = 0.6                          # the hit
    p2[150, 150] = 0.9                        # false positives above it
    p3[150, 150] = 0.8
    res = camelyon_froc([p1, p2, p3], [m1, m2, m3], [UM] * 3)
    # by hand, 3 slides: threshold 0.9 -> (1/3 FP per slide, sens 0); 0.8 -> (2/3, 0); 0.6 -> (2/3, 1).
    # Sensitivity at 1/4 and 1/2 FP per slide: 0; at 1, 2, 4, 8: 1 -> FROC 4/6.
    assert res["FROC"] == pytest.approx(4 / 6)
    assert res["sensitivity_at"]["0.5"] == pytest.approx(0.0) and res["sensitivity_at"]["1"] == pytest.approx(1.0)


def test_an_itc_is_neither_a_target_nor_a_false_positive():
    prob, mask = slide(itc=True)
    prob[50, 50] = 0.7                        # the lesion
    prob[151, 151] = 0.95                     # on the ITC: ignored
    res = camelyon_froc([prob], [mask], [UM])
    assert res["num_lesions"] == 1 and res["FROC"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_curve_agrees_with_the_reference_whenever_a_lesion_is_missed(seed):
    from monai.metrics import compute_froc_curve_data  # the reference script's curve, copied by MONAI

    rng = np.random.default_rng(seed)
    fp = rng.uniform(0.5, 1.0, rng.integers(0, 6))
    tp = np.where(rng.uniform(size=7) < 0.4, 0.0, rng.uniform(0.5, 1.0, 7))
    tp[0] = 0.0                                # at least one missed lesion
    ours = froc_curve(fp, tp, 7, 3)
    ref = compute_froc_curve_data(fp.astype(np.float32), tp.astype(np.float32), 7, 3)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-6)
