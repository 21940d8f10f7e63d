"""Anchors for images on the bundled digits model: the claimed precision holds on fresh
samples, the KL bounds solve KL(p || q) = level, empty-anchor coverage, determinism, options
and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.optimize import brentq

from onnxsal import methods
from onnxsal.cli import cli
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.methods.anchors import _Sampler, anchor_search, kl_bernoulli, kl_lower, kl_upper

DATA = Path(__file__).parent / "data"
OPTS = {"segmentation": "slic", "fill": 0.0}


@pytest.fixture(scope="module")
def digits():
    eng = Engine(DATA / "digits_cnn.onnx", device="cpu", threads=1, use_disk_cache=False)
    with np.load(DATA / "digits_sample.npz", allow_pickle=False) as z:
        x = z["x"][::50].astype(np.float32) / 255.0
    return eng, x


@pytest.fixture(scope="module")
def explained(digits):
    eng, x = digits
    return methods.get("anchor")(eng, x, **OPTS)


def test_precision_holds_on_fresh_samples(digits, explained):
    eng, x = digits
    info = explained.info
    assert info["met_threshold"].any()
    thr, tau = info["threshold"], info["tau"]
    rng = np.random.default_rng(12345)
    for i in range(len(x)):
        seg, anchor = info["segments"][i], info["anchors"][i]
        k = seg.max() + 1
        # the map marks exactly the anchor's superpixels
        np.testing.assert_array_equal(explained.maps[i], np.isin(seg, anchor).astype(np.float32))
        z = rng.random((1000, k)) < 0.5
        z[:, anchor] = True
        imgs = x[i][None] * z[:, seg][:, None]  # absent superpixels black (fill 0)
        prec = (eng.logits(imgs).argmax(1) == explained.targets[i]).mean()
        if info["met_threshold"][i]:
            assert prec >= thr - tau, (i, anchor, prec)
        lb, ub = info["bounds"][i]
        assert lb <= info["precision"][i] <= ub
        # coverage: the share of unconstrained samples keeping the anchor, near 2^-|A|
        assert abs(info["coverage"][i] - 0.5 ** len(anchor)) < 0.02
        ex = info["examples"][i]
        assert ex["positive"].shape[1] == k and ex["positive"][:, anchor].all()
        assert ex["negative"][:, anchor].all()
        assert (ex["negative_class"] != explained.targets[i]).all()
    assert (info["evaluations"] >= 100).all() and (info["engine_calls"] >= 1).all()


def test_kl_bounds_solve_the_divergence_equation():
    p = np.array([0.0, 0.3, 0.5, 0.9, 0.97, 1.0])
    level = np.array([0.05, 0.01, 0.2, 0.02, 0.003, 0.1])
    up, lo = kl_upper(p, level), kl_lower(p, level)
    for pi, li, u, low in zip(p, level, up, lo, strict=True):
        f = lambda q, pi=pi, li=li: float(kl_bernoulli(pi, q)) - li  # noqa: E731
        want_u = brentq(f, pi + 1e-15, 1 - 1e-13) if f(1 - 1e-13) > 0 else 1.0
        want_l = brentq(f, 1e-13, pi - 1e-15) if pi > 0 and f(1e-13) > 0 else 0.0
        assert abs(u - want_u) < 1e-6 and abs(low - want_l) < 1e-6
    # p = 1: KL(1 || q) = -log q, so the lower bound is exp(-level) in closed form
    assert abs(float(kl_lower(1.0, 0.1)) - np.exp(-0.1)) < 1e-9
    assert abs(float(kl_upper(0.0, 0.1)) - (1 - np.exp(-0.1))) < 1e-9


def test_empty_anchor_has_full_coverage(digits):
    eng, x = digits
    # a constant model: every sample is positive, so the empty anchor is valid at once
    seg = np.zeros((20, 20), np.int64)
    seg[10:] = 1

    class Constant:
        def logits(self, imgs):
            return np.tile([[0.0, 1.0]], (len(imgs), 1))

    rng = np.random.default_rng(0)
    s = _Sampler(Constant(), x[0], seg, np.zeros_like(x[0]), 1, rng, 3)
    opts = dict(methods.get("anchor").defaults)
    res = anchor_search(s, rng.random((1000, 2)) < 0.5, opts)
    assert res["anchor"] == [] and res["coverage"] == 1.0 and res["met_threshold"]
    assert res["precision"] == 1.0 and s.evaluations == 100


def test_deterministic_with_a_seed(digits, explained):
    eng, x = digits
    again = methods.get("anchor")(eng, x, **OPTS)
    assert again.info["anchors"] == explained.info["anchors"]
    np.testing.assert_array_equal(again.maps, explained.maps)
    np.testing.assert_array_equal(again.info["evaluations"], explained.info["evaluations"])


@pytest.mark.parametrize("opts, match", [
    ({"threshold": 1.5}, "threshold=1.5"), ({"tau": 0}, "tau=0"), ({"batch_size": 0}, "batch_size"),
    ({"segmentation": "watershed"}, "segmentation"), ({"delta": "x"}, "numbers"),
    ({"max_anchor_size": 0}, "max_anchor_size"), ({"fill": "grey"}, "anchor fill.*superpixel_mean")])
def test_option_errors_are_one_line(digits, opts, match):
    eng, x = digits
    with pytest.raises(OptionError, match=match) as err:
        methods.get("anchor")(eng, x[:1], **opts)
    assert "\n" not in str(err.value)


def test_cli_explain_with_anchor(tmp_path):
    with np.load(DATA / "digits_sample.npz", allow_pickle=False) as z:
        np.savez(tmp_path / "two.npz", x=z["x"][:2], y=z["y"][:2])
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["explain", str(DATA / "digits_cnn.onnx"), str(tmp_path / "two.npz"),
                                   "-m", "anchor", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with np.load(out / "maps.npz") as maps:
        arrays = [maps[k] for k in maps.files if k.endswith("/anchor")]
    assert arrays and all(set(np.unique(a)) <= {0.0, 1.0} for a in arrays)
