"""Similarity functions of the sanity checks against known values (docs/definitions.md#similarity)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsal.metrics import similarity as S


def test_identical_maps_are_similar_one():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 28, 28))
    got = S.compare(a, a)
    assert set(got) == set(S.METRICS)
    for k, v in got.items():
        assert v == pytest.approx(1.0, abs=1e-12), k


def test_spearman_known_values():
    x = np.arange(50.0)
    assert S.spearman(x, x[::-1]) == pytest.approx(-1.0, abs=1e-12)
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    assert S.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8, abs=1e-12)
    # rank correlation ignores monotone transforms
    assert S.spearman(x, np.exp(x / 10)) == pytest.approx(1.0, abs=1e-12)


def test_reversed_signed_maps_give_minus_one():
    m = np.arange(-32.0, 32.0).reshape(8, 8)
    assert S.spearman_signed(m, -m) == pytest.approx(-1.0, abs=1e-12)
    # the absolute maps of m and -m are the same map
    assert S.spearman_abs(m, -m) == pytest.approx(1.0, abs=1e-12)


def test_normalize_abs_hand_made():
    s = np.arange(100.0).reshape(10, 10)
    m = np.stack([s / 2, -s / 2])  # sum of |.| over channels = s
    # 99th percentile of 0..99 with linear interpolation: 98 + 0.01 * (99 - 98) = 98.01
    expected = np.clip(s / 98.01, 0, 1)
    got = S.normalize_abs(m)
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[9, 9] == 1.0 and got[0, 0] == 0.0
    # min is subtracted (PAIR VisualizeImageGrayscale)
    np.testing.assert_allclose(S.normalize_abs(s + 5.0), expected, atol=1e-12)


def test_normalize_signed_hand_made():
    s = np.arange(-50.0, 50.0).reshape(10, 10)
    m = np.stack([s / 2, s / 2])  # sum over channels = s
    # |s| sorted: 0, 1, 1, ..., 49, 49, 50; the 99th percentile sits at rank 98.01 -> 49.01
    expected = np.clip(s / 49.01, -1, 1)
    got = S.normalize_signed(m)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got.min() == -1.0 and got[5, 0] == 0.0
    # channels cancel in the signed map, not in the absolute one
    c = np.stack([s, -s])
    assert not S.normalize_signed(c).any()
    assert S.normalize_abs(c).max() == 1.0


def test_constant_maps_normalise_to_zero_and_have_defined_correlations():
    z = np.zeros((8, 8))
    assert not S.normalize_abs(z).any() and not np.isnan(S.normalize_abs(z)).any()
    assert not S.normalize_signed(z).any()
    ramp = np.arange(64.0).reshape(8, 8)
    assert S.spearman(z, ramp) == 0.0
    assert S.spearman(z, z) == 1.0
    assert S.hog_similarity(z, ramp / 63) == 0.0


def test_sparse_map_scales_by_max_when_p99_is_zero():
    m = np.zeros((10, 10))
    m[3, 4] = 7.0  # one pixel of 100: the 99th percentile is 0
    got = S.normalize_abs(m)
    assert got[3, 4] == 1.0 and got.sum() == 1.0


def test_ssim_and_hog():
    rng = np.random.default_rng(2)
    a = rng.random((28, 28))
    b = rng.random((28, 28))
    assert S.ssim(a, a) == pytest.approx(1.0)
    assert S.hog_similarity(a, a) == pytest.approx(1.0)
    assert S.hog_similarity(a, a, "spearman") == pytest.approx(1.0)
    assert S.ssim(a, b) < 0.2 and S.ssim(a, b) == pytest.approx(S.ssim(b, a))
    assert abs(S.hog_similarity(a, b)) < 0.5
    # an 8 x 8 map still works (window shrinks to 7)
    assert S.ssim(a[:8, :8], a[:8, :8]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        S.hog_similarity(a, b, "kendall")


def test_hog_cell_scales_with_image_size():
    assert S.hog_cell((224, 224)) == (16, 16)
    assert S.hog_cell((112, 448)) == (8, 32)
    assert S.hog_cell((28, 28)) == (2, 2)
    assert S.hog_cell((8, 8)) == (1, 1)


def test_nan_maps_give_nan():
    a = np.ones((3, 8, 8))
    a[0, 1, 1] = np.nan
    b = np.random.default_rng(0).random((3, 8, 8))
    got = S.compare(a, b)
    assert all(np.isnan(v) for v in got.values())
