"""Faithfulness metrics (onnxsal/metrics/faithfulness.py) on an ONNX linear model whose exact
attribution is w * x, and hand-computed curves on 2x2 images; one runs through the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.cli import cli
from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics import faithfulness as fm


def linear_model(w: np.ndarray, b: np.ndarray):
    """predict_logits of ONNX Flatten -> Gemm: logits = x.flatten() @ w.T + b (run by ORT)."""
    k, d = w.shape
    h = int(round(d ** 0.5))
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]),
         helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1)],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, h, h])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(w.astype(np.float32), "W"),
         numpy_helper.from_array(b.astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    calls = []

    def predict(x):
        calls.append(len(x))
        return sess.run(None, {"x": np.asarray(x, np.float32)})[0]

    predict.calls = calls
    return predict


@pytest.fixture
def lin():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 36))
    w[0] = np.abs(w[0]) + 0.1  # class 0 has positive weights
    x = rng.uniform(0.1, 1.0, size=(5, 1, 6, 6)).astype(np.float32)
    b = np.array([50.0, 0.0, 0.0])  # class 0 is the prediction on every image
    exact = (w[0].reshape(6, 6) * x[:, 0]).astype(np.float64)  # the attribution w * x
    return linear_model(w, b), x, exact


def test_2x2_region_perturbation_curves_by_hand():
    w = np.array([[4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0]])
    predict = linear_model(w, np.array([1.0, 0.0]))
    x = np.ones((1, 1, 2, 2), np.float32)
    m = np.array([[[0.4, 0.3], [0.2, 0.1]]])
    morf = fm.RegionPerturbationMoRF(patch=1, steps=4)
    r = morf(predict, x, m)
    # logits 11, then remove 4, 3, 2, 1: 7, 4, 2, 1; AUC trapezoid on x = 0, .25, ..., 1
    np.testing.assert_allclose(r["curve"], [11, 7, 4, 2, 1])
    assert r["value"] == pytest.approx(0.25 * (11 / 2 + 7 + 4 + 2 + 1 / 2))
    lerf = fm.RegionPerturbationLeRF(patch=1, steps=4)(predict, x, m)
    np.testing.assert_allclose(lerf["curve"], [11, 10, 8, 5, 1])
    abpc = fm.ABPC(patch=1, steps=4)(predict, x, m)
    assert abpc["value"] == pytest.approx(lerf["value"] - r["value"])
    # patch 2: one region; the curve goes from 11 to 1 in one step
    np.testing.assert_allclose(fm.RegionPerturbationMoRF(patch=2)(predict, x, m)["curve"], [11, 1])
    # mean baseline: removed pixels become the mean of the image (1): nothing changes
    np.testing.assert_allclose(fm.RegionPerturbationMoRF(patch=1, baseline="mean")(
        predict, x, m)["curve"], [11] * 5)


def test_the_exact_map_has_the_best_morf_and_lerf_curves(lin):
    predict, x, exact = lin
    kw = dict(patch=2, steps=9)
    rng = np.random.default_rng(1)
    rand = rng.normal(size=exact.shape)
    morf, lerf = fm.RegionPerturbationMoRF(**kw), fm.RegionPerturbationLeRF(**kw)
    best, other = morf(predict, x, exact), morf(predict, x, rand)
    # removing patches in descending sum of w*x is the greedy optimum of a linear model
    assert (best["curve"] <= other["curve"] + 1e-9).all()
    assert best["value"] < other["value"]
    assert lerf(predict, x, exact)["value"] > lerf(predict, x, rand)["value"]
    assert fm.ABPC(**kw)(predict, x, exact)["value"] > fm.ABPC(**kw)(predict, x, rand)["value"]


def test_variants_go_to_the_model_in_one_batch(lin):
    predict, x, exact = lin
    fm.RegionPerturbationMoRF(patch=2, steps=9)(predict, x, exact)
    assert predict.calls == [5 * (1 + 9)]
    predict.calls.clear()
    fm.ABPC(patch=2, steps=9)(predict, x, exact)
    assert predict.calls == [5 * (1 + 2 * 9)]
    predict.calls.clear()
    fm.FaithfulnessCorrelation(runs=20)(predict, x, exact)
    assert predict.calls == [5 * 21]


def test_faithfulness_correlation_is_one_for_the_exact_map(lin):
    predict, x, exact = lin
    fc = fm.FaithfulnessCorrelation(subset=0.2, runs=30, seed=3)
    r = fc(predict, x, exact)
    np.testing.assert_allclose(r["per_image"], 1.0, atol=1e-6)
    assert fc(predict, x, -exact)["value"] == pytest.approx(-1.0, abs=1e-6)
    noisy = fc(predict, x, np.random.default_rng(2).normal(size=exact.shape))["value"]
    assert abs(noisy) < 0.9
    # seeded: the same result again, another seed gives other subsets
    assert (fc(predict, x, exact + 0.1 * x[:, 0])["per_image"] ==
            fc(predict, x, exact + 0.1 * x[:, 0])["per_image"]).all()
    assert not (fc.subsets(x) == fm.FaithfulnessCorrelation(0.2, 30, seed=4).subsets(x)).all()
    # the subsets of an image do not depend on the other images of the batch
    assert (fc.subsets(x[2:3]) == fc.subsets(x)[2:3]).all()


def test_faithfulness_correlation_by_hand_on_2x2():
    """subset of 1 of 4 pixels: the drop is w_i x_i, the sum is the map at i."""
    w = np.array([[4.0, 3.0, 2.0, 1.0], [0, 0, 0, 0]])
    predict = linear_model(w, np.array([1.0, 0.0]))
    x = np.ones((1, 1, 2, 2), np.float32)
    m = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # anti-correlated with the drop 4 - i
    fc = fm.FaithfulnessCorrelation(subset=0.25, runs=12, seed=0)
    picked = fc.subsets(x)[0].argmax(axis=1)
    drops, sums = np.array([4.0, 3, 2, 1])[picked], m.reshape(-1)[picked]
    ref = np.corrcoef(drops, sums)[0, 1]
    assert ref == pytest.approx(-1.0)
    assert fc(predict, x, m)["value"] == pytest.approx(ref)


def test_monotonicity_by_hand_on_2x2():
    w = np.array([[4.0, 3.0, -2.0, 1.0], [0, 0, 0, 0]])
    predict = linear_model(w, np.array([10.0, 0.0]))
    x = np.ones((1, 1, 2, 2), np.float32)
    mono = fm.Monotonicity(steps=4)
    # |map| ascending puts back pixel 3 (+1), 2 (-2), 1 (+3), 0 (+4): the logit falls once
    r = mono(predict, x, np.array([[[0.4, 0.3], [0.2, 0.1]]]))
    np.testing.assert_allclose(r["curve"], [10, 11, 9, 12, 16])
    assert r["value"] == 0.0
    # a map that puts the negative pixel first: 10, 8, 9, 12, 16 falls too (first step)
    r = mono(predict, x, np.array([[[0.4, 0.3], [0.0, 0.1]]]))
    np.testing.assert_allclose(r["curve"], [10, 8, 9, 12, 16])
    assert r["value"] == 0.0
    w2 = np.abs(w)
    r = mono(linear_model(w2, np.array([10.0, 0.0])), x, np.array([[[0.4, 0.3], [0.2, 0.1]]]))
    np.testing.assert_allclose(r["curve"], [10, 11, 13, 16, 20])
    assert r["value"] == 1.0


def test_uniform_baseline_is_seeded_per_image(lin):
    _, x, _ = lin
    a = fm.baseline(x, "uniform", seed=5)
    assert (a == fm.baseline(x, "uniform", seed=5)).all()
    assert (a[1:2] == fm.baseline(x[1:2], "uniform", seed=5)).all()
    assert not (a == fm.baseline(x, "uniform", seed=6)).all()
    assert 0 <= a.min() and a.max() < 1


def test_nan_maps_are_failures_not_crashes(lin):
    predict, x, exact = lin
    exact = exact.copy()
    exact[1, 0, 0] = np.nan
    for cls in (fm.RegionPerturbationMoRF, fm.FaithfulnessCorrelation, fm.Monotonicity):
        r = cls()(predict, x, exact)
        assert r["valid_images"] == 4 and np.isnan(r["per_image"][1])


def test_registered_and_options_refused():
    for n in ("region-perturbation-morf", "region-perturbation-lerf", "abpc",
              "faithfulness-correlation", "monotonicity", "sensitivity-n", "infidelity"):
        assert n in metrics.names()
    with pytest.raises(OptionError, match="baseline"):
        fm.RegionPerturbationMoRF(baseline="pink")
    with pytest.raises(OptionError, match="patch"):
        fm.RegionPerturbationMoRF(patch=0)
    with pytest.raises(OptionError, match="subset"):
        fm.FaithfulnessCorrelation(subset=1.5)


def test_faithfulness_correlation_through_onnxsal_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))
    from pathlib import Path
    data = Path(__file__).parent / "data"
    out = tmp_path / "out"
    args = ["benchmark", str(data / "digits_cnn.onnx"), "--data", str(data / "digits_sample.npz"),
            "--limit", "12", "-m", "original", "--add-metric", "faithfulness-correlation",
            "--add-metric", "region-perturbation-morf", "--metric", "allegiance",
            "--out", str(out), "--quiet", "--threads", "1", "--device", "cpu"]
    res = __import__("click.testing", fromlist=["CliRunner"]).CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    d = json.loads((out / "results.json").read_text())
    entry = d["results"][0]["metrics"]
    fc = entry["faithfulness-correlation"]
    assert fc["direction"] == "higher" and fc["images"] == 12
    assert -1 <= fc["value"] <= 1
    rp = entry["region-perturbation-morf"]
    assert rp["direction"] == "lower" and len(rp["curve"]) == len(rp["x"]) == 17


def test_sensitivity_n_is_one_at_every_n_for_the_exact_map(lin):
    predict, x, exact = lin
    sn = fm.SensitivityN(fractions=(0.05, 0.3, 0.7), runs=25, seed=1)
    predict.calls.clear()
    r = sn(predict, x, exact)
    assert predict.calls == [5 * (1 + 3 * 25)]  # every n of the batch in one call
    np.testing.assert_allclose(r["curve"], 1.0, atol=1e-6)
    assert r["value"] == pytest.approx(1.0, abs=1e-6)
    # a map that is exact on half of the pixels only: r < 1 at every n
    half = exact.copy()
    half[:, 3:] = np.random.default_rng(0).uniform(0, 1, size=half[:, 3:].shape)
    r = sn(predict, x, half)
    assert (r["curve"] < 0.999).all()
    # its subset of one size is the faithfulness correlation's subset of that size
    fc = fm.FaithfulnessCorrelation(subset=0.3, runs=25, seed=1)
    assert (fc.subsets(x) == sn.subsets(x, 0.3)).all()
    with pytest.raises(OptionError, match="fractions"):
        fm.SensitivityN(fractions=(0.5, 0.1))


def test_infidelity_is_zero_for_the_gradient_of_a_linear_model(lin):
    predict, x, exact = lin
    assert fm.Infidelity().perturbations(x).shape == (5, 50, 6, 6)  # [N, R, H, W]
    grad = exact / x[:, 0]  # w, the gradient of the target logit
    inf = fm.Infidelity(sigma=0.2, runs=30, seed=2)
    predict.calls.clear()
    assert inf(predict, x, grad)["value"] == pytest.approx(0.0, abs=1e-8)
    assert predict.calls == [5 * 31]
    # scale does not matter (beta), the map's pattern does: by hand with the same draws
    assert inf(predict, x, 7 * grad)["value"] == pytest.approx(0.0, abs=1e-8)
    other = exact  # w * x: not the gradient
    pert = inf.perturbations(x).astype(np.float64)
    drop = np.einsum("nrhw,hw->nr", pert, grad[0])  # the linear model's exact drop
    dot = np.einsum("nrhw,nhw->nr", pert, other)
    beta = (dot * drop).mean(1) / (dot * dot).mean(1)
    ref = ((beta[:, None] * dot - drop) ** 2).mean(1)
    np.testing.assert_allclose(inf(predict, x, other)["per_image"], ref, rtol=1e-4)
    assert (ref > 1e-3).all()
