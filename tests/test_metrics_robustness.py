"""Robustness metrics (docs/metrics.md#robustness) on explanations whose sensitivity is known
in closed form: a constant map (0), the image itself as its map (the noise's own norm over the
image's), a map k * x for the Lipschitz estimate (k), and shifts of the image-as-map (1)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics.robustness import AvgSensitivity, MaxSensitivity

RNG = np.random.default_rng(5)
X = (0.3 + 0.4 * RNG.random((5, 1, 20, 20))).astype(np.float32)  # noise of 0.2 never clips
W = RNG.normal(size=(3, 1, 20, 20))


def linear(x):
    return np.einsum("kchw,nchw->nk", W, np.asarray(x, np.float64))


class Spy:
    """An explanation that records what it was asked."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, x, t):
        self.calls.append((np.array(x), np.array(t)))
        return self.fn(np.asarray(x, np.float64), t)


def square(x, t):
    return x[:, 0] ** 2 + 0.1 * np.asarray(t, np.float64)[:, None, None]


@pytest.mark.parametrize("cls,reduce", [(MaxSensitivity, np.max), (AvgSensitivity, np.mean)])
def test_sensitivity_is_the_definition_on_the_inputs_it_sent(cls, reduce):
    spy = Spy(square)
    pred = linear(X).argmax(1)
    maps = square(X.astype(np.float64), pred)
    res = cls(spy, samples=30, radius=0.1, seed=4).evaluate(linear, X, maps)
    assert len(spy.calls) == 1  # every sample of every image in one call
    xs, ts = spy.calls[0]
    assert xs.shape == (5 * 30, 1, 20, 20)
    np.testing.assert_array_equal(ts, np.repeat(pred, 30))  # the clean image's class throughout
    xs = xs.reshape(5, 30, 1, 20, 20)
    delta = xs - X[:, None]
    assert np.abs(delta).max() <= 0.1 + 1e-6 and np.abs(delta).max() > 0.09
    expected = []
    for i in range(5):
        m = maps[i]
        ratios = [np.linalg.norm(square(xs[i, s].astype(np.float64)[None], pred[i:i + 1])[0] - m)
                  / np.linalg.norm(m) for s in range(30)]
        expected.append(reduce(ratios))
    np.testing.assert_allclose(res["value"], expected, rtol=1e-6)

    small = cls(Spy(square), samples=30, radius=0.1, seed=4)
    small.max_batch_bytes = 2 * 31 * 4 * 400  # two images per batch
    np.testing.assert_allclose(small.evaluate(linear, X, maps)["value"], res["value"], rtol=1e-12)
    tiny = cls(spy, samples=30, radius=0.1, seed=4)
    tiny.max_batch_bytes = 7 * 4 * 400  # chunks of 7 samples: same draws
    spy.calls.clear()
    np.testing.assert_allclose(tiny.evaluate(linear, X, maps)["value"], res["value"], rtol=1e-12)
    assert len(spy.calls) == 5 * 5  # one image per batch, ceil(30 / 7) calls each
    other = cls(square, samples=30, radius=0.1, seed=5).evaluate(linear, X, maps)["value"]
    assert not np.allclose(other, res["value"])


def test_sensitivity_closed_forms():
    """Phi(x) = x: ||delta|| / ||x||, with E[delta^2] = r^2 / 3 per pixel of uniform noise."""

    def identity(x, t):
        return x[:, 0]

    maps = X[:, 0].astype(np.float64)
    r, n = 0.2, 400
    norm_x = np.linalg.norm(maps.reshape(5, -1), axis=1)
    avg = AvgSensitivity(identity, samples=200, radius=r)(linear, X, maps)["per_image"]
    # the norm of the noise concentrates: relative std of ||delta||^2 is sqrt(0.8 / n) ~ 4.5%
    np.testing.assert_allclose(avg, r * np.sqrt(n / 3) / norm_x, rtol=0.01)
    mx = MaxSensitivity(identity, samples=200, radius=r)(linear, X, maps)["per_image"]
    assert (mx <= r * np.sqrt(n) / norm_x).all() and (mx > avg * 1.02).all() and (mx < avg * 1.15).all()

    def constant(x, t):
        return np.broadcast_to(W[0, 0], (len(x), 20, 20))

    for cls in (MaxSensitivity, AvgSensitivity):
        np.testing.assert_array_equal(cls(constant, samples=10)(linear, X, constant(X, 0))["per_image"], 0.0)
        # an all-zero map has no relative change: NaN, reported as a failure
        zero = cls(lambda x, t: np.zeros((len(x), 20, 20)), samples=3)(linear, X, np.zeros((5, 20, 20)))
        assert np.isnan(zero["per_image"]).all() and zero["valid_images"] == 0


def test_sensitivity_clips_to_the_pixel_range_and_needs_explain():
    spy = Spy(lambda x, t: x[:, 0])
    edge = np.zeros((1, 1, 20, 20), np.float32)
    MaxSensitivity(spy, samples=4, radius=0.5)(linear, edge, np.ones((1, 20, 20)))
    assert spy.calls[0][0].min() >= 0.0 and spy.calls[0][0].max() <= 0.5
    for name in ("max-sensitivity", "avg-sensitivity"):
        with pytest.raises(OptionError, match="explain_class"):
            metrics.get(name).from_options({})
        m = metrics.get(name).from_options({"explain_class": square, "sensitivity_samples": 7,
                                            "sensitivity_radius": 0.05, "seed": 3})
        assert m.settings() == {"samples": 7, "seed": 3, "radius": 0.05}
    with pytest.raises(OptionError, match="needs explain"):
        MaxSensitivity()(linear, X, X[:, 0])
    with pytest.raises(OptionError, match="radius"):
        MaxSensitivity(square, radius=0)


def test_local_lipschitz_closed_forms():
    from onnxsal.metrics.robustness import LocalLipschitz

    maps = 3.0 * X[:, 0].astype(np.float64)
    # Phi(x) = 3 x: ||Phi(x') - Phi(x)|| / ||x' - x|| = 3 for every neighbour (clipped or not)
    res = LocalLipschitz(lambda x, t: 3.0 * x[:, 0], samples=20, normalise=False)(linear, X, maps)
    np.testing.assert_allclose(res["per_image"], 3.0, rtol=1e-5)

    def scaled(x, t):  # one pattern, scaled by the image: its max-normalised map never moves
        return W[0, 0][None] * (1.0 + np.asarray(x, np.float64).mean(axis=(1, 2, 3)))[:, None, None]

    res = LocalLipschitz(scaled, samples=20)(linear, X, scaled(X, 0))
    np.testing.assert_allclose(res["per_image"], 0.0, atol=1e-6)
    spy = Spy(square)
    pred = linear(X).argmax(1)
    got = LocalLipschitz(spy, samples=25, std=0.05, seed=2).evaluate(linear, X, square(X, pred))["value"]
    assert len(spy.calls) == 1
    xs = spy.calls[0][0].reshape(5, 25, 1, 20, 20).astype(np.float64)
    assert 0.04 < np.std(xs - X[:, None]) < 0.06
    expected = []
    for i in range(5):
        m = square(X[i:i + 1].astype(np.float64), pred[i:i + 1])[0]
        m = m / np.abs(m).max()
        best = 0.0
        for s in range(25):
            mp = square(xs[i, s][None], pred[i:i + 1])[0]
            best = max(best, np.linalg.norm(mp / np.abs(mp).max() - m) / np.linalg.norm(xs[i, s] - X[i]))
        expected.append(best)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(OptionError, match="explain_class"):
        metrics.get("local-lipschitz").from_options({})
    m = metrics.get("local-lipschitz").from_options({"explain_class": square, "lipschitz_std": 0.2})
    assert m.settings() == {"samples": 200, "seed": 0, "std": 0.2, "normalise": True}


def _mean_half(n=4, seed=0):
    x = np.random.default_rng(seed).random((n, 1, 20, 20))
    x = 0.3 + 0.4 * x
    return (x - x.mean(axis=(1, 2, 3), keepdims=True) + 0.5).astype(np.float32)


def mean_vs_threshold(x):
    """Class 0 while the image's mean exceeds 0.48: darkening by 5% flips mean-0.5 images."""
    m = np.asarray(x, np.float64).mean(axis=(1, 2, 3))
    return np.stack([m, np.full_like(m, 0.48)], axis=1)


def test_transform_stability_exact_cases_and_exclusions():
    from onnxsal.metrics.robustness import TransformStability

    x = _mean_half()
    identity = Spy(lambda x, t: x[:, 0])
    spec = ("shift:1,0", "shift:-2,2", "brightness:1.05", "brightness:0.95")
    res = TransformStability(identity, spec)(mean_vs_threshold, x, x[:, 0])
    # the map of the shifted image, shifted back, is the original map on every pixel that
    # stayed inside; brightening scales the map, which the normalisation removes
    np.testing.assert_allclose(res["per_image"], 1.0, atol=1e-9)
    np.testing.assert_allclose(res["per_image_ssim"], 1.0, atol=1e-9)
    np.testing.assert_array_equal(res["per_image_excluded"], 1)  # darkening flips the class
    assert res["excluded"] == 4 and res["transforms"] == 4
    assert len(identity.calls) == 1 and len(identity.calls[0][0]) == 4 * 3  # kept ones only

    def blind(x, t):  # a fixed pattern that does not follow the image
        return np.broadcast_to(W[0, 0], (len(x), 20, 20))

    res = TransformStability(blind, ("shift:2,0", "brightness:1.05"))(mean_vs_threshold, x, blind(x, 0))
    shift_only = TransformStability(blind, ("shift:2,0",))(mean_vs_threshold, x, blind(x, 0))["per_image"]
    assert (np.abs(shift_only) < 0.3).all()  # W against W moved by 2 px: unrelated pixels
    np.testing.assert_allclose(res["per_image"], (shift_only + 1.0) / 2)  # mean over the kept two

    calls = []

    def flips_all(x):  # the clean images come first, then every transformed one flips
        calls.append(len(x))
        return mean_vs_threshold(x) * (1 if len(calls) == 1 else -1)

    none = TransformStability(identity, ("shift:1,0",))(flips_all, x, x[:, 0])
    assert np.isnan(none["per_image"]).all() and none["excluded"] == 4


def test_transform_stability_geometry():
    from skimage.transform import rotate

    from onnxsal.metrics.robustness import TransformStability

    x = _mean_half(2, seed=3)
    m = TransformStability(lambda x, t: x[:, 0], ("rotate:90", "rotate:2", "shift:1,-1"))
    xt = m.perturb(x)
    np.testing.assert_allclose(xt[:, 0, 0], np.rot90(x[:, 0], axes=(1, 2)), atol=1e-6)  # counter-clockwise
    np.testing.assert_allclose(xt[:, 1, 0], [rotate(a, 2, order=1, mode="edge") for a in x[:, 0]], atol=1e-6)
    np.testing.assert_allclose(xt[:, 2, 0, :-1, 1:], x[:, 0, 1:, :-1], atol=1e-6)  # right 1, up 1
    back, valid = m.back(xt[:, :, 0].astype(np.float64), (20, 20))
    np.testing.assert_allclose(back[:, 0], x[:, 0], atol=1e-6)
    np.testing.assert_allclose(back[:, 2][:, valid[2]], x[:, 0][:, valid[2]], atol=1e-6)
    assert valid[2].sum() == 19 * 19
    ref = np.array([rotate(rotate(a, 2, order=1, mode="edge"), -2, order=1) for a in x[:, 0]])
    inner = valid[1] & (np.hypot(*np.mgrid[-9.5:10.5, -9.5:10.5]) < 8)
    np.testing.assert_allclose(back[:, 1][:, inner], ref[:, inner], atol=1e-6)
    assert valid[1].sum() >= 380  # a 2-degree turn moves the corners by a third of a pixel
    rho = m(mean_vs_threshold, x, x[:, 0])
    assert (rho["per_image"] > 0.8).all() and (rho["per_image"] < 1.0).all()
    with pytest.raises(OptionError, match="rotate:DEG"):
        TransformStability(None, ("spin:3",))
    with pytest.raises(OptionError, match="explain_class"):
        metrics.get("transform-stability").from_options({})
