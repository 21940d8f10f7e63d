"""Completeness and input invariance (docs/metrics.md) on models whose attributions are
known in closed form: a numpy linear model, and a real ONNX model explained by integrated
gradients through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxsal import methods
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics.axiomatic import Completeness, InputInvariance

from test_hostile import save, tiny

RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 2, 4, 4))  # 3 classes, [C=2, H=4, W=4] inputs
B = np.array([0.5, -1.0, 2.0])
X = RNG.random((5, 2, 4, 4)).astype(np.float32)


def linear(x, w=W, b=B):
    return np.einsum("kchw,nchw->nk", w, np.asarray(x, np.float64)) + b


def grad_x_input(x, w=W):
    """Gradient x input of the predicted class summed over channels (= IG, black baseline,
    for a linear model)."""
    t = linear(x).argmax(axis=1)
    return (w[t] * x).sum(axis=1)


def test_completeness_by_hand_on_a_linear_model():
    maps = grad_x_input(X)
    got = Completeness()(linear, X, maps)["per_image"]
    np.testing.assert_allclose(got, 0.0, atol=1e-9)  # exact: sum = S(x) - S(0)
    # twice the attribution: |2d - d| / |d| = 1; with the baseline itself: S(x) - S(x') = 0
    np.testing.assert_allclose(Completeness()(linear, X, 2 * maps)["per_image"], 1.0, rtol=1e-9)
    white = Completeness(baseline="white")(linear, X, maps)["per_image"]
    t = linear(X).argmax(axis=1)
    d = linear(X)[np.arange(5), t] - linear(np.ones_like(X))[np.arange(5), t]
    np.testing.assert_allclose(white, np.abs(maps.reshape(5, -1).sum(1) - d) / np.abs(d))
    res = Completeness(baseline=X[:1])(linear, X[:1], maps[:1])
    assert np.isnan(res["per_image"][0]) and res["valid_images"] == 0


def test_completeness_of_integrated_gradients_on_an_onnx_model(tmp_path):
    m = tiny(seed=1, c=3, hw=8, classes=4)
    b = next(t for t in m.graph.initializer if t.name == "B")  # a conv bias: not homogeneous
    b.CopyFrom(numpy_helper.from_array(np.array([0.3, -0.2, 0.5, 0.1], np.float32), "B"))
    model = save(m, tmp_path / "m.onnx")
    eng = Engine(str(model), device="cpu", threads=1, use_disk_cache=False)
    x = np.random.default_rng(1).random((4, 3, 8, 8)).astype(np.float32)
    ig = methods.compute(eng, x, ["integrated_gradients"], steps=128)["integrated_gradients"]
    gi = methods.compute(eng, x, ["gradient_x_input"])["gradient_x_input"]
    c_ig = Completeness()(eng.logits, x, ig.maps)["per_image"]
    # the method's own estimate of its error agrees with the metric's
    np.testing.assert_allclose(c_ig, ig.info["relative_completeness_error"], rtol=1e-3, atol=1e-6)
    assert c_ig.max() < 0.02
    c_gi = Completeness()(eng.logits, x, gi.maps)["per_image"]
    assert np.nanmean(c_gi) > 10 * np.nanmean(c_ig)  # with a bias, grad x input is not complete


def test_input_invariance_with_a_bias_compensated_linear_model():
    c = 0.7
    b2 = B - c * W.reshape(3, -1).sum(axis=1)  # f2(x + c) = f(x): the first layer's bias shifts

    def gradient(x):  # vanilla gradient of the predicted class: W, whatever the input
        return W[linear(x).argmax(axis=1)].sum(axis=1)

    def gradient_shifted(z, t):  # the metric asks for the class the stored maps explain
        np.testing.assert_array_equal(t, linear(z, b=b2).argmax(axis=1))
        return W[t].sum(axis=1)

    def gi_shifted(z, t):
        return (W[t] * z).sum(axis=1)

    np.testing.assert_allclose(linear(X + np.float32(c), b=b2), linear(X), rtol=1e-5)
    inv = InputInvariance(gradient_shifted, shift=c)
    np.testing.assert_allclose(inv(linear, X, gradient(X))["per_image"], 0.0, atol=1e-12)
    got = InputInvariance(gi_shifted, shift=c)(linear, X, grad_x_input(X))["per_image"]
    t = linear(X).argmax(axis=1)
    # m'(x + c) - m(x) = c * sum_c W_t: hand-computed relative L1 difference
    diff = np.abs(c * W[t].sum(axis=1)).reshape(5, -1).mean(1)
    ref = diff / np.abs(grad_x_input(X)).reshape(5, -1).mean(1)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert (got > 0.05).all()


def test_the_callable_metrics_say_what_they_need():
    with pytest.raises(OptionError, match="explain_shifted"):
        metrics.get("input-invariance").from_options({})
    with pytest.raises(OptionError, match="explain_shifted"):
        InputInvariance()(linear, X, grad_x_input(X))
    assert metrics.get("completeness").from_options({}).settings() == {"baseline": "black"}
