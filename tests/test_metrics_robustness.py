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
