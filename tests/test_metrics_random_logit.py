"""The random-logit test (docs/metrics.md) with a numpy linear model whose class maps are
known: a class-blind explanation scores SSIM 1, the gradient scores the SSIM of two weight
maps, and the random class is never the predicted one nor changed by the batching."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics.randomisation_logit import RandomLogit

RNG = np.random.default_rng(3)
W = RNG.normal(size=(5, 1, 8, 8))  # 5 classes
X = RNG.random((6, 1, 8, 8)).astype(np.float32)


def linear(x):
    return np.einsum("kchw,nchw->nk", W, np.asarray(x, np.float64))


def gradient(x, t):
    return W[np.asarray(t)].sum(axis=1)


def to01(m):  # PAIR's absolute normalisation, written out: (|m| - min) / (p99 - min), clipped
    a = np.abs(m)
    return np.clip((a - a.min()) / (np.percentile(a, 99) - a.min()), 0, 1)


def test_random_logit_scores():
    pred = linear(X).argmax(axis=1)
    maps = gradient(X, pred)
    res = RandomLogit(gradient, seed=1).evaluate(linear, X, maps)
    other = res["other"]
    assert (other != pred).all() and ((0 <= other) & (other < 5)).all()
    ref = [structural_similarity(to01(W[p, 0]), to01(W[o, 0]), gaussian_weights=True,
                                 data_range=1.0, win_size=7) for p, o in zip(pred, other, strict=True)]
    np.testing.assert_allclose(res["value"], ref, rtol=1e-9)
    assert (res["value"] < 0.9).all()

    def blind(x, t):  # ignores the class: the test must flag it with SSIM 1
        return np.abs(x).sum(axis=1)

    np.testing.assert_allclose(RandomLogit(blind)(linear, X, blind(X, pred))["per_image"], 1.0)
    small = RandomLogit(gradient, seed=1)
    small.max_batch_bytes = 2 * 4 * 64  # two images per batch
    again = small.evaluate(linear, X, maps)
    np.testing.assert_array_equal(again["other"], other)
    np.testing.assert_allclose(again["value"], res["value"])
    assert not np.array_equal(RandomLogit(gradient, seed=2).evaluate(linear, X, maps)["other"], other)


def test_random_logit_needs_the_callable():
    with pytest.raises(OptionError, match="explain_class"):
        metrics.get("random-logit").from_options({})
    with pytest.raises(OptionError, match="needs explain"):
        RandomLogit()(linear, X, gradient(X, [0] * 6))
