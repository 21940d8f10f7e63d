"""Black/white deletion (docs/definitions.md#deletion) and RISE deletion/insertion
(docs/definitions.md#rise-metrics), checked against small examples worked out by hand and against
plain-loop re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxsal.errors import InputError, OptionError
from onnxsal.metrics.deletion import FRACTIONS, BlackWhiteDeletion, auc, delete, deletion_counts, deletion_masks
from onnxsal.metrics.rise import RiseDeletion, RiseInsertion, blur, pixel_order

# ---------------------------------------------------------------------------------------------
# the deletion rule


def test_fractions_are_the_ten_decimal_literals():
    assert FRACTIONS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_k_uses_python_round_half_to_even():
    # H*W = 5: p*5 = 0, .5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5
    # Python's round sends halves to the even integer: .5->0, 1.5->2, 2.5->2, 3.5->4, 4.5->4
    assert deletion_counts(1, 5) == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]
    # H*W = 15: p*15 = 1.5 (p=.1) -> 2, 4.5 (p=.3) -> 4, 7.5 -> 8, 10.5 -> 10, 13.5 -> 14
    assert deletion_counts(3, 5) == [0, 2, 3, 4, 6, 8, 9, 10, 12, 14]


def test_distinct_values_delete_exactly_k_pixels_from_the_top():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    masks = deletion_masks(s[None])[0]  # [P, 1, 5]
    counts = masks.reshape(10, -1).sum(axis=1).tolist()
    assert counts == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]
    # p = 0.3: k = round(1.5) = 2, v = sorted[2] = 3: delete 5 and 4
    assert masks[3].tolist() == [[True, True, False, False, False]]


def test_ties_at_the_threshold_stay():
    s = np.array([[3.0, 2.0, 2.0], [2.0, 1.0, 0.0]])  # H*W = 6, sorted: 3 2 2 2 1 0
    m = deletion_masks(s[None], [0.2, 0.3, 0.5, 0.7, 0.9])[0]
    # p=.2: k=round(1.2)=1, v=2 -> only the 3; p=.3: k=round(1.8)=2, v=2 -> still only the 3
    assert m[0].sum() == 1 and m[0][0, 0]
    assert m[1].sum() == 1
    assert m[2].sum() == 1  # p=.5: k=3, v=2
    # p=.7: k=round(4.2)=4, v=1 -> 3 and the three 2s
    assert m[3].tolist() == [[True, True, True], [True, False, False]]
    # p=.9: k=round(5.4)=5, v=0 -> everything but the zero
    assert m[4].tolist() == [[True, True, True], [True, True, False]]


def test_zero_saliency_pixels_are_never_deleted():
    s = np.zeros((1, 4, 4))
    s[0, 0, 0] = 1.0
    m = deletion_masks(s)
    assert m[0, :, 0, 0].tolist() == [False] + [True] * 9
    assert m[0].reshape(10, -1).sum(axis=1).max() == 1  # sparse maps saturate
    assert not deletion_masks(np.zeros((2, 5, 5))).any()


def test_p_zero_deletes_nothing_and_tiny_maps_do_not_overflow():
    rng = np.random.default_rng(0)
    assert not deletion_masks(rng.random((3, 7, 7)))[:, 0].any()
    # H*W = 4: k = round(0.9 * 4) = 4 = H*W; all non-zero pixels may go, no IndexError
    m = deletion_masks(np.array([[[4.0, 3.0], [0.0, 1.0]]]), [0.9])
    assert m[0, 0].tolist() == [[True, True], [False, True]]


def test_delete_sets_every_channel_to_black_or_white():
    x = np.full((1, 3, 2, 2), 0.5, np.float32)
    mask = np.array([[[[True, False], [False, False]]]])
    b = delete(x, mask, "black")[0, 0]
    w = delete(x, mask, "white")[0, 0]
    assert b[:, 0, 0].tolist() == [0, 0, 0] and w[:, 0, 0].tolist() == [1, 1, 1]
    assert (b[:, 1:, :] == 0.5).all() and (w[:, :, 1] == 0.5).all()
    with pytest.raises(OptionError):
        delete(x, mask, "grey")


def test_auc_trapezoid_dx_point_one_not_normalised():
    assert auc([1.0] * 10) == pytest.approx(0.9)
    curve = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0]
    by_hand = 0.1 * (sum(curve) - (curve[0] + curve[-1]) / 2)
    assert auc(curve) == pytest.approx(by_hand, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# the metric against a loop re-implementation


def _linear_model(seed=0, d=2 * 4 * 4, classes=3):
    W = np.random.default_rng(seed).normal(size=(d, classes))
    calls = []

    def predict_logits(x):
        calls.append(len(x))
        return x.reshape(len(x), -1).astype(np.float64) @ W

    return predict_logits, calls


def _loop_oracle(predict, images, maps, mode, ref):
    """Plain Python: sort, pick the threshold, delete pixel by pixel, predict one by one."""
    n, c, h, w = images.shape
    curve = []
    for p in FRACTIONS:
        hits = 0
        for i in range(n):
            vals = sorted(maps[i].ravel().tolist(), reverse=True)
            k = round(p * h * w)
            v = vals[k]
            x = images[i].copy()
            for r in range(h):
                for q in range(w):
                    s = maps[i, r, q]
                    if s > v and s != 0:
                        x[:, r, q] = 0.0 if mode == "black" else 1.0
            hits += int(np.argmax(predict(x[None])[0]) == ref[i])
        curve.append(hits / n)
    return curve


@pytest.mark.parametrize("metric", ["accuracy", "allegiance"])
def test_black_white_deletion_matches_a_loop_implementation(metric):
    rng = np.random.default_rng(1)
    x = rng.random((6, 2, 4, 4)).astype(np.float32)
    maps = np.round(rng.random((6, 4, 4)), 1)  # coarse values: plenty of ties
    maps[0] = 0.0
    maps[1, :2] = 0.0
    predict, _ = _linear_model()
    labels = np.array([0, 1, 2, 0, 1, 2])
    res = BlackWhiteDeletion(metric)(predict, x, maps, labels if metric == "accuracy" else None)
    clean = predict(x).argmax(axis=1)
    ref = labels if metric == "accuracy" else clean
    for mode in ("black", "white"):
        oracle = _loop_oracle(predict, x, maps, mode, ref)
        assert res.curves[mode] == pytest.approx(oracle, abs=1e-12)
        assert res.auc[mode] == pytest.approx(auc(oracle), abs=1e-12)
    if metric == "allegiance":
        assert res.curves["black"][0] == 1.0 and res.curves["white"][0] == 1.0
    else:
        assert res.curves["black"][0] == pytest.approx(np.mean(clean == labels))


def test_allegiance_needs_no_labels_and_accuracy_does():
    x = np.random.default_rng(0).random((2, 2, 4, 4)).astype(np.float32)
    predict, _ = _linear_model()
    with pytest.raises(OptionError, match="allegiance"):
        BlackWhiteDeletion("accuracy")(predict, x, np.ones((2, 4, 4)))
    with pytest.raises(OptionError):
        BlackWhiteDeletion("top5")
    with pytest.raises(InputError, match="maps"):
        BlackWhiteDeletion("allegiance")(predict, x, np.ones((2, 5, 4)))


def test_variants_go_through_the_model_in_large_batches():
    x = np.random.default_rng(0).random((5, 2, 4, 4)).astype(np.float32)
    predict, calls = _linear_model()
    BlackWhiteDeletion("allegiance")(predict, x, np.random.default_rng(1).random((5, 4, 4)))
    # one call: 5 clean images + 5 x 9 black + 5 x 9 white variants
    assert calls == [5 + 2 * 5 * 9]


def test_nan_maps_and_logits_are_reported_per_image_not_averaged():
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 4, 4)).astype(np.float32)
    maps = rng.random((4, 4, 4))
    maps[1, 0, 0] = np.nan
    predict, _ = _linear_model()

    maps[0, 3, 3] = 0.0  # never deleted: the marker below survives every variant of image 0
    x[0, 1, 3, 3] = 0.123

    def predict_nan(z):
        out = predict(z)
        white_of_0 = (z[:, 1, 3, 3] == np.float32(0.123)) & (z == 1.0).any(axis=(1, 2, 3))
        out[white_of_0] = np.nan
        return out

    res = BlackWhiteDeletion("allegiance")(predict_nan, x, maps)
    assert res.errors == ["non-finite logits at fraction 0.1 (white deletion)",
                          "saliency map contains NaN or Inf", "", ""]
    assert res.n_valid == 2
    assert (res.predictions["black"][:2] == -1).all()
    good = [i for i, e in enumerate(res.errors) if not e]
    sub = BlackWhiteDeletion("allegiance")(predict, x[good], maps[good])
    assert res.curves == sub.curves
    assert all(np.isfinite(v) for c in res.curves.values() for v in c)


# ---------------------------------------------------------------------------------------------
# RISE deletion and insertion


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _rise_oracle(predict, x, s, step, start, fill):
    h, w = s.shape
    order = sorted(range(h * w), key=lambda j: (-s.ravel()[j], j))
    target = int(np.argmax(predict(x[None])[0]))
    n_steps = math.ceil(h * w / step)
    scores = []
    for t in range(n_steps + 1):
        img = start.copy()
        for j in order[: min(t * step, h * w)]:
            img[:, j // w, j % w] = fill[:, j // w, j % w]
        scores.append(_softmax(predict(img[None])[0])[target])
    return np.array(scores)


@pytest.mark.parametrize("step", [1, 3, 5])
def test_rise_deletion_curve_points_and_auc(step):
    rng = np.random.default_rng(2)
    x = rng.random((3, 2, 4, 4)).astype(np.float32)
    maps = np.round(rng.random((3, 4, 4)), 1)
    predict, _ = _linear_model(3)
    res = RiseDeletion(step=step, baseline="black")(predict, x, maps)
    T = math.ceil(16 / step) + 1
    assert res.scores.shape == (3, T)
    assert res.x[0] == 0.0 and res.x[-1] == 1.0 and len(res.x) == T
    for i in range(3):
        o = _rise_oracle(predict, x[i], maps[i], step, x[i], np.zeros_like(x[i]))
        np.testing.assert_allclose(res.scores[i], o, rtol=1e-6, atol=1e-9)
        assert res.auc_per_image[i] == pytest.approx(np.trapezoid(o, np.linspace(0, 1, T)))
    assert res.auc == pytest.approx(res.auc_per_image.mean())


def test_rise_baselines_and_insertion_from_blur():
    rng = np.random.default_rng(3)
    x = rng.random((2, 2, 4, 4)).astype(np.float32)
    maps = rng.random((2, 4, 4))
    predict, _ = _linear_model(4)
    white = RiseDeletion(step=4, baseline="white")(predict, x, maps)
    mean = RiseDeletion(step=4, baseline="mean")(predict, x, maps)
    ins = RiseInsertion(step=4)(predict, x, maps)
    b = blur(x)
    for i in range(2):
        o = _rise_oracle(predict, x[i], maps[i], 4, x[i], np.ones_like(x[i]))
        np.testing.assert_allclose(white.scores[i], o, rtol=1e-6)
        m = np.broadcast_to(x[i].mean(axis=(1, 2), keepdims=True), x[i].shape)
        np.testing.assert_allclose(mean.scores[i], _rise_oracle(predict, x[i], maps[i], 4, x[i], m),
                                   rtol=1e-6)
        np.testing.assert_allclose(ins.scores[i], _rise_oracle(predict, x[i], maps[i], 4, b[i], x[i]),
                                   rtol=1e-6)
    # deletion starts from the clean image, insertion ends on it: same probability there
    np.testing.assert_allclose(white.scores[:, 0], ins.scores[:, -1], rtol=1e-6)
    assert RiseDeletion.direction == "lower" and RiseInsertion.direction == "higher"
    with pytest.raises(OptionError):
        RiseDeletion(baseline="purple")


def test_blur_kernel_is_11_pixels_at_224_and_scales():
    x = np.zeros((1, 1, 224, 224), np.float32)
    x[0, 0, 112, 112] = 1.0
    nz = np.argwhere(blur(x)[0, 0] > 0)
    assert nz.min(axis=0).tolist() == [107, 107] and nz.max(axis=0).tolist() == [117, 117]
    x = np.zeros((1, 1, 56, 56), np.float32)
    x[0, 0, 28, 28] = 1.0
    nz = np.argwhere(blur(x)[0, 0] > 0)  # sigma 1.25: radius round(1.25) = 1
    assert (nz.max(axis=0) - nz.min(axis=0)).tolist() == [2, 2]
    # small images: sigma is floored at 1 px (5 * 8 / 224 would leave the image unchanged)
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 4, 4] = 1.0
    b = blur(x)[0, 0]
    assert (np.argwhere(b > 0).max(axis=0) - np.argwhere(b > 0).min(axis=0)).tolist() == [2, 2]
    assert b[4, 4] < 0.5 and b.sum() == pytest.approx(1.0, abs=1e-6)


def test_pixel_order_is_descending_and_stable():
    r = pixel_order(np.array([[[1.0, 3.0], [3.0, 0.0]]]))
    assert r.tolist() == [[2, 0, 1, 3]]


def test_rise_small_memory_budget_gives_the_same_curves_and_nan_maps_fail_alone():
    rng = np.random.default_rng(5)
    x = rng.random((3, 2, 4, 4)).astype(np.float32)
    maps = rng.random((3, 4, 4))
    predict, calls = _linear_model(5)
    big = RiseInsertion(step=2)(predict, x, maps)
    assert calls == [3, 3 * 9]  # clean predictions, then all 3 x 9 variants in one call
    small = RiseInsertion(step=2, max_batch_bytes=3 * 2 * 16 * 4)(predict, x, maps)
    np.testing.assert_allclose(small.scores, big.scores, rtol=1e-12)
    maps[1, 2, 2] = np.nan
    res = RiseDeletion(step=2)(predict, x, maps)
    assert res.errors == ["", "saliency map contains NaN or Inf", ""]
    ok = RiseDeletion(step=2)(predict, x[[0, 2]], maps[[0, 2]])
    assert res.auc == pytest.approx(ok.auc) and np.isfinite(res.curve).all()
