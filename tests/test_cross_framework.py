"""One small CNN with the same weights in PyTorch, Keras and JAX/flax, exported by each converter:
the three ONNX files give the same logits, gradients and maps through onnxsal, and the
gradients equal each framework's own autodiff (torch.autograd, tf.GradientTape, jax.grad) on
the [0, 1] pixels, through the recorded normalisation."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.models import cross_framework_cnn as cf  # noqa: E402
from onnxsal import methods as M  # noqa: E402
from onnxsal.compare import compare_models  # noqa: E402
from onnxsal.data import load_dataset  # noqa: E402
from onnxsal.engine import Engine  # noqa: E402

MEAN, STD = 0.3, 0.4
SIZE = 16
FRAMEWORKS = ("torch", "keras", "jax")
METHODS = ["vanilla", "gradient_x_input", "integrated_gradients", "guided_backprop", "lrp",
           "gradcam", "original", "active", "occlusion"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = cf.random_weights(channels=1, classes=10, seed=0)
    paths = cf.export_all(w, SIZE, SIZE, tmp_path_factory.mktemp("xf"),
                          preprocess={"scale": 1.0, "mean": [MEAN], "std": [STD]})
    engines = {f: Engine(p, device="cpu", threads=1) for f, p in paths.items()}
    x = load_dataset("digits", shape=(1, SIZE, SIZE), limit=6).images
    targets = engines["torch"].predict(x)
    return w, paths, engines, x, targets


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_weights_really_copied(setup):
    """The oracle is not vacuous: the three frameworks give the same logits before any export."""
    w, _, _, x, targets = setup
    own = cf.framework_gradients(w, x, targets, MEAN, STD)
    assert np.abs(own["torch"][0]).max() > 0.1
    for f in ("keras", "jax"):
        assert rel(own[f][0], own["torch"][0]) < 1e-5
        assert rel(own[f][1], own["torch"][1]) < 1e-5


def test_logits_and_gradients_match_own_autodiff(setup):
    w, _, engines, x, targets = setup
    own = cf.framework_gradients(w, x, targets, MEAN, STD)
    got = {f: engines[f].gradient(x, targets) for f in FRAMEWORKS}
    for f in FRAMEWORKS:
        logits, grad = got[f]
        assert grad.shape == x.shape
        assert rel(logits, own[f][0]) < 1e-5, f
        assert rel(grad, own[f][1]) < 1e-5, f        # onnxsal vs the framework's own autodiff
    for f, g in itertools.combinations(FRAMEWORKS, 2):
        assert rel(got[f][0], got[g][0]) < 1e-5, (f, g)
        assert rel(got[f][1], got[g][1]) < 1e-5, (f, g)


def test_same_maps_through_onnxsal(setup):
    _, _, engines, x, targets = setup
    maps = {f: M.compute(engines[f], x, METHODS, targets=targets) for f in FRAMEWORKS}
    for name in METHODS:
        ref = maps["torch"][name].maps
        assert np.abs(ref).max() > 0, name
        for f in ("keras", "jax"):
            assert rel(maps[f][name].maps, ref) < 1e-4, (name, f)


def test_compare_calls_them_the_same_model(setup):
    _, paths, engines, x, _ = setup
    rep = compare_models(engines["torch"], engines["jax"], x, ["vanilla", "gradcam"], atol=1e-4)
    assert rep["verdict"].startswith("same model"), rep["verdict"]
    assert rep["methods"]["gradcam"]["spearman_min"] > 0.99
