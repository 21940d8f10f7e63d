"""The five signed and multi-class maps (docs/definitions.md#signed-maps) against torch autograd.

The oracle below is written from the table in docs/definitions.md#signed-maps alone: the full Jacobian by torch
autograd,
then for each image the per-channel values of the table, with "g_c > g_q for every q != c"
evaluated literally (torch.all over the other classes), then the channel max.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxsal import methods
from onnxsal.engine import Engine
from onnxsal.methods.normalize import minmax

from conftest import export_torch

FIVE = ("original", "positive", "negative", "active", "inactive")


def torch_signed_maps(module: torch.nn.Module, x: np.ndarray, targets=None):
    """docs/definitions.md#signed-maps by torch autograd: {name: (map [N,H,W], per-channel [N,C,H,W])},
    plus the margins g_c - max_{q!=c} g_q and g_c - min_{q!=c} g_q (for near-tie checks)."""
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    module = module.double().eval()
    y = module(xt)
    jac = torch.stack([torch.autograd.grad(y[:, q].sum(), xt, retain_graph=True)[0]
                       for q in range(y.shape[1])])  # [Q, N, C, H, W]
    t = y.argmax(1) if targets is None else torch.as_tensor(targets)
    out = {k: [] for k in FIVE}
    margins_hi, margins_lo = [], []
    for n in range(len(x)):
        c = int(t[n])
        g = jac[c, n]
        others = torch.cat([jac[:c, n], jac[c + 1:, n]])
        active = torch.where(torch.all(g[None] > others, dim=0), g, torch.zeros_like(g))
        inactive = torch.where(torch.all(g[None] < others, dim=0), g, torch.zeros_like(g))
        per = {"original": g.abs(), "positive": g.clamp(min=0), "negative": (-g).clamp(min=0),
               "active": active, "inactive": inactive}
        for k, v in per.items():
            out[k].append((v.abs().amax(dim=0), v))
        margins_hi.append(g - others.amax(0))
        margins_lo.append(g - others.amin(0))
    res = {k: (torch.stack([a for a, _ in v]).numpy(), torch.stack([b for _, b in v]).numpy())
           for k, v in out.items()}
    module.float()
    return res, torch.stack(margins_hi).numpy(), torch.stack(margins_lo).numpy(), t.numpy()


def make_engine(model) -> Engine:
    return Engine(model, device="cpu", threads=1, use_disk_cache=False)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(42)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=2, padding=2), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    x = np.random.default_rng(1).random((4, 3, 24, 24), dtype=np.float32)
    return net, make_engine(export_torch(net, torch.from_numpy(x[:1]))), x


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_five_maps_match_torch_autograd(cnn, chunk):
    net, eng, x = cnn
    ref, hi, lo, t = torch_signed_maps(net, x)
    res = methods.compute(eng, x, FIVE, chunk=chunk)
    for name in FIVE:
        got = res[name]
        assert got.maps.shape == (4, 24, 24) and got.maps.dtype == np.float32
        np.testing.assert_array_equal(got.targets, t)
        want_map, want_raw = ref[name]
        scale = np.abs(ref["original"][0]).max()
        diff = np.abs(got.raw - want_raw)
        if name in ("active", "inactive"):
            # a mask may only differ where the oracle's own margin is a rounding-level tie
            margin = hi if name == "active" else lo
            flipped = diff > 1e-4 * scale
            assert np.all(np.abs(margin[flipped]) < 1e-5 * scale), name
            assert flipped.mean() < 1e-3, name
            keep = ~flipped
            diff = np.where(keep, diff, 0)
            wm = np.where(flipped.any(axis=1), 0, want_map)
            gm = np.where(flipped.any(axis=1), 0, got.maps)
            mdiff = float(np.abs(gm - wm).max())
        else:
            mdiff = float(np.abs(got.maps - want_map).max())
        assert mdiff <= 1e-4 * scale, (name, mdiff, scale)
        assert diff.max() <= 1e-4 * scale, name
    # the active and inactive maps are not trivially empty on this model
    assert (res["active"].maps > 0).mean() > 0.05
    assert (res["inactive"].maps > 0).mean() > 0.05


def test_single_method_calls_agree_with_compute(cnn):
    net, eng, x = cnn
    together = methods.compute(eng, x, FIVE)
    for name in FIVE:
        alone = methods.get(name)(eng, x)
        np.testing.assert_array_equal(alone.maps, together[name].maps)
        assert alone.signed is False
    assert methods.get("active").needs >= {"class_gradients"}
    assert "class_gradients" not in methods.get("original").needs


def test_explicit_targets(cnn):
    net, eng, x = cnn
    targets = np.array([0, 3, 9, 3])
    ref, *_ = torch_signed_maps(net, x, targets)
    res = methods.compute(eng, x, ["original", "negative"], targets=targets)
    np.testing.assert_array_equal(res["original"].targets, targets)
    scale = ref["original"][0].max()
    for name in ("original", "negative"):
        assert np.abs(res[name].maps - ref[name][0]).max() <= 1e-4 * scale


# --- exact ties and constant maps on a linear model, where g_q is exactly row q of W ----


class Linear(torch.nn.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(w))
            self.fc.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


def tie_weights():
    """4 classes on a 3x2x3 input (C, H, W); class 0 (the target) is set element by element.

    Other classes are 0.5, -0.5 and 0.25 everywhere except where noted; channel 2 of
    class 0 is 0 (neither active nor inactive)."""
    shape = (3, 2, 3)
    w = np.zeros((4,) + shape, np.float32)
    w[1], w[2], w[3] = 0.5, -0.5, 0.25
    w[0, :2] = np.array([[[0.5, 0.9, 0.2],     # ch 0: tie with the max (class 1) | active | see below
                      [-0.5, -0.9, 0.0]],  #       tie with the min (class 2) | inactive | neither
                     [[0.3, -0.7, 0.3],    # ch 1: neither | inactive | neither
                      [0.6, -0.6, -0.1]]],  #      active | inactive | see below
                    np.float32)
    # (ch 0, 0, 2): a positive g_c below every other class -> inactive, |I| = 0.2
    w[1:, 0, 0, 2] = [0.4, 0.6, 0.8]
    # (ch 1, 1, 2): a negative g_c above every other class -> active, |A| = 0.1
    w[1:, 1, 1, 2] = [-0.9, -0.8, -0.7]
    return w, shape


def test_exact_ties_strict_comparison_and_abs_after_masking():
    w, shape = tie_weights()
    b = np.array([50.0, 0.0, 0.0, 0.0], np.float32)  # class 0 is predicted
    net = Linear(w.reshape(4, -1), b)
    x = np.random.default_rng(0).random((2,) + shape, dtype=np.float32)
    eng = make_engine(export_torch(net, torch.from_numpy(x[:1])))
    res = methods.compute(eng, x, FIVE)
    ref, *_ = torch_signed_maps(net, x)
    np.testing.assert_array_equal(res["active"].targets, [0, 0])

    # expected by hand; strict ">" turns the ties at (0, 0) and (1, 0) into zeros
    f = np.float32
    active = np.array([[0, 0.9, 0], [0.6, 0, 0.1]], f)
    inactive = np.array([[0, 0.7, 0.2], [0, 0.9, 0]], f)
    g0 = w[0]
    for n in range(2):
        np.testing.assert_array_equal(res["active"].maps[n], active)
        np.testing.assert_array_equal(res["inactive"].maps[n], inactive)
        assert res["active"].raw[n, 1, 1, 2] == f(-0.1)      # signed before the abs
        assert res["inactive"].raw[n, 0, 0, 2] == f(0.2)
        np.testing.assert_array_equal(res["original"].maps[n], np.abs(g0).max(axis=0))
        np.testing.assert_array_equal(res["positive"].maps[n], np.maximum(g0, 0).max(axis=0))
        np.testing.assert_array_equal(res["negative"].maps[n], np.maximum(-g0, 0).max(axis=0))
    for name in FIVE:  # the torch oracle agrees (float64 there)
        np.testing.assert_allclose(res[name].maps, ref[name][0], rtol=0, atol=1e-7)
    # with chunks of one class the running max/min sees the ties across chunks
    res1 = methods.compute(eng, x, ["active", "inactive"], chunk=1)
    np.testing.assert_array_equal(res1["active"].maps[0], active)
    np.testing.assert_array_equal(res1["inactive"].maps[0], inactive)


def test_all_classes_tied_gives_constant_zero_maps_and_no_nan():
    shape = (1, 3, 3)
    w = np.tile(np.linspace(-1, 1, 9, dtype=np.float32), (3, 1))  # every class the same row
    net = Linear(w, np.array([1.0, 0.0, 0.0], np.float32))
    x = np.random.default_rng(0).random((2,) + shape, dtype=np.float32)
    eng = make_engine(export_torch(net, torch.from_numpy(x[:1])))
    res = methods.compute(eng, x, FIVE)
    for name in ("active", "inactive"):
        assert np.all(res[name].maps == 0)
        norm = minmax(res[name].maps)
        assert np.all(norm == 0) and not np.isnan(norm).any()
    assert res["original"].maps.max() == 1.0


def test_constant_gradient_maps_normalise_to_zero():
    shape = (3, 4, 4)
    w = np.stack([np.full(48, v, np.float32) for v in (0.3, -0.2)])
    net = Linear(w, np.array([1.0, 0.0], np.float32))
    x = np.random.default_rng(0).random((1,) + shape, dtype=np.float32)
    eng = make_engine(export_torch(net, torch.from_numpy(x)))
    res = methods.compute(eng, x, FIVE)
    np.testing.assert_array_equal(res["original"].maps, np.full((1, 4, 4), 0.3, np.float32))
    np.testing.assert_array_equal(res["active"].maps, np.full((1, 4, 4), 0.3, np.float32))
    np.testing.assert_array_equal(res["negative"].maps, np.zeros((1, 4, 4), np.float32))
    for name in FIVE:
        norm = minmax(res[name].maps)
        assert not np.isnan(norm).any()
        np.testing.assert_array_equal(norm, np.zeros((1, 4, 4), np.float32))


def test_minmax():
    m = np.array([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]], [[-2.0, 0.0], [0.0, 2.0]]])
    out = minmax(m)
    np.testing.assert_allclose(out[0], [[0, 0.5], [0.25, 1]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))
    np.testing.assert_allclose(out[2], [[0, 0.5], [0.5, 1]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(minmax(m[0]), out[0])
    assert not np.isnan(minmax(np.zeros((3, 5, 5)))).any()
