"""Parity with Quantus 0.6.0 (the reference toolkit) for the metrics both define alike.

The model: the bundled digits CNN (the paper's CNN at half width, 20x20 grey input), loaded
into its torch definition (benchmarks/models/paper_models.py) from the ONNX file's weights and
exported again with torch.onnx.export. Quantus runs the torch module, onnxsal the ONNX export
(their logits agree to ~1e-5). The maps are |gradient| of the predicted logit (torch autograd)
on 8 held-out digits; both tools get the same maps and, as ``y_batch``, the class the model
predicts (onnxsal's target). Quantus's ``normalise`` divides by the maximum over the whole
batch (not per image) by default; where a score depends on the scale it is switched off or set
to per-image axes. Where Quantus draws at random (faithfulness correlation's subsets), its draw
is replaced by onnxsal's, so both compute on the same subsets. Where the definitions differ
the documented relationship is asserted (docs/metrics.md#parity-with-quantus).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import quantus  # a dev dependency (pyproject: quantus==0.6.0)
import torch

from onnxsal.metrics import base as metrics

DATA = Path(__file__).parent / "data"
N = 8


@pytest.fixture(scope="module")
def setup():
    import onnx
    from onnx import numpy_helper

    from benchmarks.models.paper_models import paper_cnn
    from onnxsal.engine import Engine
    from tests.conftest import export_torch

    torch.manual_seed(0)
    src = onnx.load(DATA / "digits_cnn.onnx")
    net = paper_cnn(10, 1, (16, 32, 64)).eval()
    net.load_state_dict({i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                         for i in src.graph.initializer})
    d = np.load(DATA / "digits_sample.npz")
    x = d["x"][::25][:N].astype(np.float32) / 255.0  # 8 digits of 8 classes
    engine = Engine(export_torch(net, torch.from_numpy(x[:1])), threads=1)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    y = logits.argmax(1)
    xt = torch.from_numpy(x).requires_grad_()
    net(xt)[torch.arange(N), torch.from_numpy(y)].sum().backward()
    a = xt.grad.abs().numpy()  # [N, 1, H, W]
    return {"net": net, "engine": engine, "x": x, "y": y, "a": a, "maps": a[:, 0],
            "logits": logits, "masks": x > 0.5}


def q_raw(setup, metric, a=None, **extra):
    """What a Quantus metric returns (softmax off: onnxsal scores logits)."""
    kw = dict(model=setup["net"], x_batch=setup["x"], y_batch=setup["y"],
              a_batch=setup["a"] if a is None else a, channel_first=True, device="cpu",
              softmax=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(**{**kw, **extra})


def q(setup, metric, a=None, **extra):
    """Quantus per-image scores."""
    return np.asarray(q_raw(setup, metric, a, **extra), np.float64)


def o(setup, metric):
    """onnxsal's per-image arrays (``evaluate``) of a metric instance."""
    return metric.evaluate(setup["engine"].logits, setup["x"], setup["maps"])


def test_model_agrees(setup):
    diff = np.abs(setup["engine"].logits(setup["x"]) - setup["logits"]).max()
    assert diff < 1e-4, diff
    assert (setup["engine"].logits(setup["x"]).argmax(1) == setup["y"]).all()
    # the maps have no ties, so both tools' pixel orders are the same
    assert all(len(np.unique(m)) > 0.9 * m.size for m in setup["maps"])


def test_complexity_metrics(setup):
    qq = dict(normalise=False, disable_warnings=True)
    sp = q(setup, quantus.Sparseness(**qq))
    assert np.abs(sp - o(setup, metrics.get("sparseness")())["value"]).max() < 1e-6
    cx = q(setup, quantus.Complexity(**qq))
    assert np.abs(cx - o(setup, metrics.get("complexity")())["value"]).max() < 1e-5
    # effective complexity: Quantus's eps applies after normalising by the max; per image
    # (normalise_axes 1..3) it is onnxsal's relative threshold
    eff = q(setup, quantus.EffectiveComplexity(
        eps=1e-2, normalise=True, normalise_func_kwargs={"normalise_axes": [1, 2, 3]},
        disable_warnings=True))
    np.testing.assert_array_equal(eff, o(setup, metrics.get("effective-complexity")(1e-2))["value"])
    # with Quantus's default (the batch's max) the counts differ: the documented difference
    eff_batch = q(setup, quantus.EffectiveComplexity(eps=1e-2, disable_warnings=True))
    assert (eff_batch <= eff).all() and (eff_batch < eff).any()


@pytest.mark.parametrize("qcls,name", [("PointingGame", "pointing-game"),
                                       ("RelevanceMassAccuracy", "relevance-mass-accuracy"),
                                       ("RelevanceRankAccuracy", "relevance-rank-accuracy"),
                                       ("AttributionLocalisation", "attribution-localisation"),
                                       ("AUC", "localisation-auc")])
def test_localisation(setup, qcls, name):
    s = setup["masks"]
    qv = q(setup, getattr(quantus, qcls)(normalise=False, disable_warnings=True), s_batch=s)
    ov = o(setup, metrics.get(name)(masks=s[:, 0]))["value"]
    assert np.abs(qv - ov).max() < 1e-6, (qv, ov)


def test_attribution_localisation_weighted(setup):
    """onnxsal (as Kohlbrenner et al.): mu_w = mu * image area / mask area. Quantus 0.6.0
    multiplies mu by mask area / ``x_batch[2:].size`` (the size of the batch from its third
    image on, not of one image): onnxsal * S_in^2 / (H W * x_batch[2:].size) = Quantus."""
    s = setup["masks"]
    qv = q(setup, quantus.AttributionLocalisation(weighted=True, normalise=False,
                                                  disable_warnings=True), s_batch=s)
    ov = o(setup, metrics.get("attribution-localisation")(masks=s[:, 0], weighted=True))["value"]
    s_in = s.reshape(N, -1).sum(axis=1)
    hw = s[0].size
    np.testing.assert_allclose(ov * s_in ** 2 / (hw * setup["x"][2:].size), qv, rtol=1e-6)


def test_pixel_flipping_morf_lerf(setup):
    """Quantus PixelFlipping (black, 25 pixels a step) = onnxsal region perturbation at patch
    1, 16 steps, curve point by point; LeRF = Quantus on the negated map."""
    for name, sign in (("region-perturbation-morf", 1), ("region-perturbation-lerf", -1)):
        qc = q(setup, quantus.PixelFlipping(features_in_step=25, perturb_baseline="black",
                                            normalise=False, disable_warnings=True),
               a=sign * setup["a"])
        res = o(setup, metrics.get(name)(patch=1, steps=16))
        assert qc.shape == (N, 16)
        assert np.abs(res["curve"][:, 1:] - qc).max() < 1e-4
        # onnxsal's value: the AUC of (clean, Quantus's curve) on [0, 1]
        auc = np.trapezoid(np.concatenate([setup["logits"][np.arange(N), setup["y"]][:, None],
                                           qc], axis=1), x=np.linspace(0, 1, 17), axis=1)
        assert np.abs(res["value"] - auc).max() < 1e-4


def test_faithfulness_correlation(setup, monkeypatch):
    """Quantus FaithfulnessCorrelation with np.random.choice replaced by onnxsal's subsets
    (40 of the 400 pixels, 100 runs): the same Pearson r per image."""
    m = metrics.get("faithfulness-correlation")(subset=0.1, runs=100)
    ov = o(setup, m)["value"]
    sub = m.subsets(setup["x"])  # bool [N, R, H*W]
    draws = iter([np.flatnonzero(sub[i, r]) for r in range(100) for i in range(N)])
    monkeypatch.setattr(np.random, "choice", lambda *args, **kw: next(draws))
    qv = q(setup, quantus.FaithfulnessCorrelation(nr_runs=100, subset_size=40,
                                                   perturb_baseline="black",
                                                   return_aggregate=False,
                                                   disable_warnings=True))
    assert np.abs(qv - ov).max() < 1e-5, (qv, ov)


def test_monotonicity(setup, monkeypatch):
    """Quantus Monotonicity (Arya; black, |map|, 25 pixels a step). Its default perturb_func
    (baseline_replacement_by_indices) writes the baseline into the baseline image, so the
    original pixels never come back: the curve is flat and every map is "monotonic". With a
    perturb_func that puts the original pixels back (the definition), Quantus's curve (read
    where it calls np.diff on it) is onnxsal's without the all-baseline first point, and the
    verdicts agree on that curve."""
    x = setup["x"]
    flat = x.reshape(N, -1)
    rows = np.arange(N)[:, None]

    def put_back(arr, indices, **kwargs):
        out = np.array(arr, copy=True)
        out[rows, indices] = flat[rows, indices]
        return out

    res = o(setup, metrics.get("monotonicity")(steps=16))
    curve = res["curve"]
    qdefault = q(setup, quantus.Monotonicity(features_in_step=25, perturb_baseline="black",
                                             normalise=False, disable_warnings=True))
    assert qdefault.all()  # Quantus's default: always monotonic (the flat curve)
    seen = []
    diff = np.diff
    monkeypatch.setattr(np, "diff", lambda a, *args, **kw: (seen.append(np.array(a)),
                                                           diff(a, *args, **kw))[1])
    qv = q(setup, quantus.Monotonicity(features_in_step=25, perturb_baseline="black",
                                       perturb_func=put_back, normalise=False,
                                       disable_warnings=True))
    monkeypatch.setattr(np, "diff", diff)
    assert np.abs(seen[-1] - curve[:, 1:]).max() < 1e-4
    np.testing.assert_array_equal(qv, (np.diff(curve[:, 1:], axis=1) >= 0).all(axis=1))
    # onnxsal also checks the first step from the baseline image: monotonic there implies Quantus
    assert (qv[res["value"] == 1] == 1).all()
    # the curves are real: the logit of the clean image is reached at the last step
    np.testing.assert_allclose(curve[:, -1], setup["logits"][np.arange(N), setup["y"]], atol=1e-4)


def test_road_imputation_and_accuracy(setup):
    """ROAD at noise 0 (both deterministic): onnxsal's linear imputation equals Quantus's
    noisy_linear_imputation image by image, and Quantus ROAD's per-percentage top-1 agreement
    equals the argmax of onnxsal's imputed images."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    pct = [10, 30, 50, 70, 90]
    x, maps = setup["x"], setup["maps"]
    road = metrics.get("road-morf")(percentages=[p / 100 for p in pct], noise=0.0)
    var = road.variants(x, maps)  # [N, P, 1, H, W]
    order = np.argsort(-maps.reshape(N, -1), axis=1)
    diff = max(np.abs(noisy_linear_imputation(arr=x[i], indices=order[i, :4 * p], noise=0.0)
                      - var[i, t]).max() for i in range(N) for t, p in enumerate(pct))
    assert diff < 1e-5, diff
    qres = q_raw(setup, quantus.ROAD(percentages=pct, noise=0.0, disable_warnings=True))
    pred = setup["engine"].logits(var.reshape((-1,) + x.shape[1:])).argmax(1).reshape(N, -1)
    onnx_acc = (pred == setup["y"][:, None]).mean(axis=0)
    np.testing.assert_allclose([qres[p] for p in pct], onnx_acc, atol=1e-12)


def test_completeness(setup):
    """Quantus Completeness is `sum(a) == S(x) - S(x')` exactly (False for any real map);
    onnxsal's relative gap uses the same S(x) - S(x') (black baseline), read here from
    Quantus's output_func."""
    seen = []

    def out(delta):
        seen.append(np.asarray(delta, np.float64))
        return delta

    qv = q(setup, quantus.Completeness(output_func=out, perturb_baseline="black",
                                       normalise=False, disable_warnings=True))
    delta = seen[0]
    ov = o(setup, metrics.get("completeness")("black"))["value"]
    total = setup["maps"].reshape(N, -1).sum(axis=1)
    np.testing.assert_allclose(ov, np.abs(total - delta) / np.abs(delta), rtol=1e-4)
    assert not qv.any() and (ov > 0).all()
