"""Smooth and efficient MPRT (docs/metrics.md#randomisation) on a one-Gemm ONNX model built with
onnx.helper: its gradient map for class k is the weight row W[k], on the trained model and on
the randomised one (whose new weights are read from the randomised ModelProto), so both scores
follow by hand from the two weight matrices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from scipy import stats

from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics.randomisation import randomize
from onnxsal.metrics.randomisation_mprt import EfficientMPRT, SmoothMPRT, discrete_entropy, model_explainer
from onnxsal.metrics.sanity import find_layers

K, H = 4, 10
RNG = np.random.default_rng(11)
W = RNG.normal(size=(K, H * H)).astype(np.float32)
X = RNG.random((5, 1, H, H)).astype(np.float32)


def gemm_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "linear",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, H, H])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", K])],
                          [numpy_helper.from_array(W, "W"),
                           numpy_helper.from_array(np.linspace(-1, 1, K).astype(np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def weights(model: onnx.ModelProto) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W").astype(np.float64)


class GradientTimesInput:
    """The map W[t] * x of a model (its own weights), recording every call."""

    def __init__(self):
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def __call__(self, model, x, t):
        self.calls.append((id(model), np.array(x), np.array(t)))
        return weights(model)[np.asarray(t)].reshape(-1, H, H) * np.asarray(x, np.float64)[:, 0]


def predict(x):
    return np.asarray(x, np.float64).reshape(len(x), -1) @ W.T.astype(np.float64) + np.linspace(-1, 1, K)


def test_efficient_mprt_by_hand():
    model = gemm_model()
    rand = weights(randomize(model, find_layers(model), seed=3))
    assert not np.allclose(rand, W)
    pred = predict(X).argmax(1)
    explain = model_explainer("gradient_x_input")  # the engine's own gradient: W[t] * x
    res = EfficientMPRT(model, explain, seed=3).evaluate(predict, X, np.zeros((5, H, H)))
    expected = []
    for i, t in enumerate(pred):
        h0 = stats.entropy(np.histogram(W[t] * X[i].ravel(), bins=100)[0])
        h1 = stats.entropy(np.histogram(rand[t] * X[i].ravel(), bins=100)[0])
        expected.append((h1 - h0) / h0)
    np.testing.assert_allclose(res["value"], expected, rtol=1e-9)
    assert discrete_entropy(np.ones(7)) == 0.0  # one filled bin
    assert discrete_entropy(np.arange(100.0)) == pytest.approx(np.log(100))
    # a method that ignores the weights keeps its entropy: 0
    blind = EfficientMPRT(model, lambda m, x, t: np.asarray(x, np.float64)[:, 0])(predict, X, X[:, 0])
    np.testing.assert_allclose(blind["per_image"], 0.0)


def test_smooth_mprt_by_hand():
    model = gemm_model()
    rand = weights(randomize(model, find_layers(model), seed=0))
    pred = predict(X).argmax(1)
    spy = GradientTimesInput()
    m = SmoothMPRT(model, spy, samples=6, noise=0.1)
    res = m.evaluate(predict, X, np.zeros((5, H, H)))
    assert len(spy.calls) == 2 and spy.calls[0][0] == id(model) != spy.calls[1][0]
    xs = spy.calls[0][1]
    np.testing.assert_array_equal(xs, spy.calls[1][1])  # the same noisy copies for both models
    np.testing.assert_array_equal(spy.calls[0][2], np.repeat(pred, 6))
    xs = xs.reshape(5, 6, 1, H, H).astype(np.float64)
    np.testing.assert_array_equal(xs[:, -1], X)  # the last copy is the clean image
    noise = xs[:, :-1] - X[:, None]
    inside = (xs[:, :-1] > 0) & (xs[:, :-1] < 1)
    spread = np.ptp(X.reshape(5, -1), axis=1)
    for i in range(5):
        assert abs(noise[i][inside[i]].std() / (0.1 * spread[i]) - 1) < 0.1
    expected = [stats.spearmanr(np.abs((W[t] * xs[i, :, 0].reshape(6, -1)).mean(0)),
                                np.abs((rand[t] * xs[i, :, 0].reshape(6, -1)).mean(0)))[0]
                for i, t in enumerate(pred)]
    np.testing.assert_allclose(res["value"], expected, rtol=1e-9)
    two = SmoothMPRT(model, GradientTimesInput(), samples=6, noise=0.1)
    two.max_batch_bytes = 2 * 6 * 4 * H * H
    np.testing.assert_allclose(two.evaluate(predict, X, np.zeros((5, H, H)))["value"], res["value"])
    # a method blind to the weights scores 1 (smoothing leaves its ranks the same for both)
    blind = SmoothMPRT(model, lambda m, x, t: np.asarray(x, np.float64)[:, 0], samples=4)
    np.testing.assert_allclose(blind(predict, X, X[:, 0])["per_image"], 1.0)


def test_mprt_options():
    for name in ("smooth-mprt", "efficient-mprt"):
        with pytest.raises(OptionError, match="model and explain_model"):
            metrics.get(name).from_options({})
        with pytest.raises(OptionError, match="explain_model"):
            metrics.get(name).from_options({"model": gemm_model()})
    s = metrics.get("smooth-mprt").from_options({"model": gemm_model(), "explain_model": GradientTimesInput(),
                                                 "smprt_samples": 3, "seed": 2})
    assert s.settings() == {"seed": 2, "samples": 3, "noise": 0.1}
    e = metrics.get("efficient-mprt").from_options({"model": gemm_model(), "explain_model": GradientTimesInput(),
                                                    "emprt_bins": 20})
    assert e.settings() == {"seed": 0, "bins": 20}
    with pytest.raises(OptionError, match="needs model"):
        SmoothMPRT()(predict, X, X[:, 0])
