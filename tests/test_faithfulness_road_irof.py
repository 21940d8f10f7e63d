"""ROAD's noisy linear imputation and IROF (onnxsal/metrics/road_irof.py): imputations and
curves computed by hand on 2x2 and 3x3 images, an ONNX linear model, one batched model call."""

from __future__ import annotations

import numpy as np
import pytest
from test_faithfulness_metrics import linear_model

from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics import road_irof as ri


def test_imputing_the_centre_of_3x3_is_the_weighted_mean_of_its_8_neighbours():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    miss = np.zeros((3, 3), bool)
    miss[1, 1] = True
    out = ri.linear_impute(x, miss)
    direct, diag = 1 + 3 + 5 + 7, 0 + 2 + 6 + 8
    assert out[0, 1, 1] == pytest.approx((direct / 6 + diag / 12) / (4 / 6 + 4 / 12))
    assert (out[0][~miss] == x[0][~miss]).all()


def test_imputation_solves_the_coupled_system_of_adjacent_missing_pixels():
    """2x2 [[1, 2], [3, 4]] with (1,0), (1,1) missing: 5a - 2b = 4, 5b - 2a = 5 by hand."""
    x = np.array([[[1, 2], [3, 4]]], np.float32)
    miss = np.array([[False, False], [True, True]])
    out = ri.linear_impute(np.concatenate([x, 2 * x]), miss)  # two channels, one system
    np.testing.assert_allclose(out[0, 1], [10 / 7, 11 / 7], rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], [20 / 7, 22 / 7], rtol=1e-6)
    rng = np.random.default_rng(0)  # the fixed point property on a larger random case
    y = rng.random((1, 7, 5)).astype(np.float32)
    m = rng.random((7, 5)) < 0.6
    z = ri.linear_impute(y, m)[0].astype(np.float64)
    for i, j in zip(*np.nonzero(m), strict=True):
        num = den = 0.0
        for di, dj, wt in ri.NEIGHBOURS:
            if 0 <= i + di < 7 and 0 <= j + dj < 5:
                num, den = num + wt * z[i + di, j + dj], den + wt
        assert z[i, j] == pytest.approx(num / den, rel=1e-5)
    with pytest.raises(OptionError, match="known pixel"):
        ri.linear_impute(y, np.ones((7, 5), bool))


def test_road_curves_by_hand_on_2x2():
    predict = linear_model(np.array([[1.0, 1, 1, 1], [0, 0, 0, 0]]), np.zeros(2))
    x = np.array([[[[1, 2], [3, 4]]]], np.float32)
    m = np.array([[[0.1, 0.2], [0.3, 0.4]]])
    road = ri.RoadMoRF(percentages=(0.25, 0.5, 0.75), noise=0.0)
    r = road(predict, x, m)
    # 25%: (1,1) -> (2/6 + 3/6 + 1/12) / (5/12) = 2.2; 50%: 10/7 + 11/7; 75%: all 1
    np.testing.assert_allclose(r["curve"], [10, 8.2, 6, 4], rtol=1e-6)
    assert r["value"] == pytest.approx(np.trapezoid([10, 8.2, 6, 4], x=[0, 0.25, 0.5, 0.75]))
    # LeRF takes (0,0) first: (2/6 + 3/6 + 4/12) / (5/12) = 2.8
    lerf = ri.RoadLeRF(percentages=(0.25,), noise=0.0)(predict, x, m)
    np.testing.assert_allclose(lerf["curve"], [10, 11.8], rtol=1e-6)
    assert predict.calls[-1] == 2


def test_road_noise_is_seeded_and_batched():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 36))
    predict = linear_model(w, np.array([40.0, 0, 0]))
    x = rng.random((4, 1, 6, 6)).astype(np.float32)
    m = rng.normal(size=(4, 6, 6))
    a = ri.RoadMoRF(noise=0.05, seed=1)(predict, x, m)
    assert predict.calls[-1] == 4 * 10  # the clean images and 9 percentages, one call
    b = ri.RoadMoRF(noise=0.05, seed=1)(predict, x[1:2], m[1:2])
    assert a["per_image"][1] == b["per_image"][0]
    c = ri.RoadMoRF(noise=0.05, seed=2)(predict, x, m)
    assert not (a["per_image"] == c["per_image"]).any()
    # a constant image imputes to itself: without noise the curve is flat
    flat = ri.RoadMoRF(noise=0.0)(predict, np.full((1, 1, 6, 6), 0.5, np.float32), m[:1])
    np.testing.assert_allclose(flat["curve"], flat["curve"][0], rtol=1e-5)


def test_irof_by_hand_on_quadrant_superpixels():
    rng = np.random.default_rng(5)
    w = np.zeros((2, 36))
    w[0] = rng.uniform(0.5, 1.5, 36)
    predict = linear_model(w, np.array([-8.0, 0.0]))
    x = np.full((1, 1, 6, 6), 0.1, np.float32)
    x[:, :, 3:] = 0.9
    x[:, :, :, 3:] += 0.05
    irof = ri.IROF(segments=4, compactness=0.1)
    lab = irof.superpixels(x[0])
    quads = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 6)),
             (slice(3, 6), slice(0, 3)), (slice(3, 6), slice(3, 6))]
    for q in quads:  # slic gives the four quadrants
        assert len(np.unique(lab[q])) == 1
    assert len(np.unique(lab)) == 4
    m = np.zeros((1, 6, 6))
    for q, r in zip(quads, (0.2, 0.5, 0.1, 0.9), strict=True):
        m[(0,) + q] = r
    order = [3, 1, 0, 2]  # descending mean relevance
    img = x[0, 0].astype(np.float64)
    p = []
    for k in range(5):
        y = img.copy()
        for q in order[:k]:
            y[quads[q]] = img.mean()
        z = float((w[0] * y.reshape(-1)).sum()) - 8.0
        p.append(1 / (1 + np.exp(-z)) if z > 0 else 1 / (1 + np.exp(z)))  # the clean class
    rel = np.array(p) / p[0]
    ref = 1 - np.trapezoid(rel, x=np.linspace(0, 1, 5))
    assert irof(predict, x, m)["value"] == pytest.approx(ref, rel=1e-6)
    assert predict.calls[-1] == 5


def test_registered_and_options_refused():
    for n in ("road-morf", "road-lerf", "irof"):
        assert n in metrics.names()
    with pytest.raises(OptionError, match="percentages"):
        ri.RoadMoRF(percentages=(0.5, 0.2))
    with pytest.raises(OptionError, match="baseline"):
        ri.IROF(baseline="pink")
