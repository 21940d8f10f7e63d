"""Parity with Quantus 0.6.0 (the reference toolkit) for max-sensitivity, avg-sensitivity, the
local Lipschitz estimate and the smooth and efficient MPRT: one small torch CNN, explained by
torch autograd for Quantus and by onnxsal's gradient pass on its ONNX export for onnxsal,
scored on the same maps.

Exact parity: Quantus is given onnxsal's own perturbed inputs (its ``perturb_func`` replays
them), so the two differ only in the formula, which must agree to float precision. For the
Lipschitz estimate Quantus runs with ``batch_size=1`` and maps already divided by their
maximum: Quantus divides a batch of maps by one common maximum, onnxsal each map by its own
(docs/metrics.md#local-lipschitz-estimate-local-lipschitz). Statistical parity: with each
tool's own noise, average-sensitivity agrees within the Monte Carlo error. For the MPRTs
Quantus's layer generator yields the torch net carrying onnxsal's randomised weights (Quantus
re-draws with PyTorch's ``reset_parameters``), and smooth MPRT's ``np.random.randn`` replays
onnxsal's standard normal draws."""

from __future__ import annotations

import numpy as np
import pytest
import quantus  # the dev extra installs it
import torch

from onnxsal import methods
from onnxsal.engine import Engine
from onnxsal.metrics.robustness import AvgSensitivity, LocalLipschitz, MaxSensitivity

from conftest import export_torch

S = 24


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 10 * 10, 3)).eval()
    engine = Engine(export_torch(net, torch.zeros(1, 1, 12, 12)), threads=1, use_disk_cache=False)
    x = (0.3 + 0.4 * np.random.default_rng(0).random((6, 1, 12, 12))).astype(np.float32)
    t = engine.logits(x).argmax(1)

    def explain_onnx(images, targets):
        return methods.compute(engine, images, ["vanilla"], targets=targets)["vanilla"].maps

    return net, engine, x, t, explain_onnx, explain_onnx(x, t)


def explain_torch(model, inputs, targets, **kwargs):
    xt = torch.tensor(np.asarray(inputs, np.float32), requires_grad=True)
    out = model(xt)
    out[torch.arange(len(xt)), torch.as_tensor(np.asarray(targets, np.int64))].sum().backward()
    return xt.grad.sum(dim=1, keepdim=True).numpy()


class Replay:
    """A Quantus perturb_func handing out the inputs onnxsal drew, draw by draw."""

    def __init__(self, xp: np.ndarray, per_call: int):
        self.xp, self.per_call, self.calls = xp, per_call, 0  # xp [B, S, C, H, W]

    def __call__(self, arr, indices, **kwargs):
        b, s = self.xp.shape[:2]
        if self.per_call == b:  # one call per draw, all images
            out = self.xp[:, self.calls]
        else:  # batch_size 1: image after image, every draw of one image in turn
            out = self.xp[self.calls // s, self.calls % s][None]
        self.calls += 1
        return out.reshape(len(arr), -1).astype(arr.dtype)


@pytest.mark.parametrize("ours,theirs", [(MaxSensitivity, quantus.MaxSensitivity),
                                         (AvgSensitivity, quantus.AvgSensitivity)])
def test_sensitivity_equals_quantus_on_the_same_draws(setup, ours, theirs):
    net, engine, x, t, explain_onnx, maps = setup
    m = ours(explain_onnx, samples=S, radius=0.1, seed=3)
    got = m.evaluate(engine.logits, x, maps)["value"]
    m._start = 0
    replay = Replay(m.perturb(x), len(x))
    ref = theirs(nr_samples=S, perturb_func=replay, disable_warnings=True)(
        model=net, x_batch=x, y_batch=t, a_batch=maps[:, None], explain_func=explain_torch,
        batch_size=len(x))
    assert replay.calls == S
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert (got > 0).all()


def test_local_lipschitz_equals_quantus_on_the_same_draws(setup):
    net, engine, x, t, explain_onnx, maps = setup
    m = LocalLipschitz(explain_onnx, samples=S, std=0.05, seed=1)
    got = m.evaluate(engine.logits, x, maps)["value"]
    m._start = 0
    replay = Replay(m.perturb(x), 1)
    peak = np.abs(maps).max(axis=(1, 2), keepdims=True)
    ref = quantus.LocalLipschitzEstimate(nr_samples=S, perturb_func=replay, disable_warnings=True)(
        model=net, x_batch=x, y_batch=t, a_batch=(maps / peak)[:, None], explain_func=explain_torch,
        batch_size=1)
    assert replay.calls == S * len(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_avg_sensitivity_agrees_with_quantus_own_noise(setup):
    net, engine, x, t, explain_onnx, maps = setup
    got = AvgSensitivity(explain_onnx, samples=100, radius=0.1)(engine.logits, x, maps)["per_image"]
    np.random.seed(0)
    ref = np.asarray(quantus.AvgSensitivity(nr_samples=100, lower_bound=0.1, disable_warnings=True)(
        model=net, x_batch=x, y_batch=t, a_batch=maps[:, None], explain_func=explain_torch,
        batch_size=len(x)))
    # the mean of 100 draws: a few per cent of Monte Carlo error per image
    np.testing.assert_allclose(got, ref, rtol=0.1)
    assert abs(got.mean() / ref.mean() - 1) < 0.05


def _randomised_twin(net, onnx_model, seed):
    """The torch net with onnxsal's randomised weights (the ONNX initializers keep the torch
    parameter names), for Quantus's layer generator."""
    import copy

    from onnx import numpy_helper

    from onnxsal.metrics.randomisation import randomize
    from onnxsal.metrics.sanity import find_layers

    rmodel = randomize(onnx_model, find_layers(onnx_model), seed=seed)
    values = {t.name: numpy_helper.to_array(t) for t in rmodel.graph.initializer}
    twin = copy.deepcopy(net)
    state = twin.state_dict()
    assert set(state) <= set(values)
    twin.load_state_dict({k: torch.tensor(values[k].reshape(state[k].shape)) for k in state})
    return twin


def test_efficient_mprt_equals_quantus_on_the_same_randomised_model(setup, monkeypatch):
    from onnxsal.metrics.randomisation_mprt import EfficientMPRT, model_explainer

    net, engine, x, t, explain_onnx, maps = setup
    onnx_model = engine.source_model
    twin = _randomised_twin(net, onnx_model, seed=2)
    assert not torch.allclose(twin[0].weight, net[0].weight)

    def generator(self, order="top_down", seed=42):
        # Quantus scores the last model of its cascade (every layer random) and skips the
        # others: every step yields the fully randomised twin
        for name in ("0", "3"):
            yield name, twin

    from quantus.helpers.model.pytorch_model import PyTorchModel

    monkeypatch.setattr(PyTorchModel, "get_random_layer_generator", generator)
    ref = quantus.EfficientMPRT(disable_warnings=True)(
        model=net, x_batch=x, y_batch=t, a_batch=maps[:, None], explain_func=explain_torch,
        batch_size=len(x))
    got = EfficientMPRT(onnx_model, model_explainer("vanilla", threads=1, use_disk_cache=False),
                        seed=2).evaluate(engine.logits, x, maps)["value"]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    assert np.abs(got).max() > 0.01


def test_smooth_mprt_equals_quantus_on_the_same_model_and_noise(setup, monkeypatch):
    from quantus.helpers.model.pytorch_model import PyTorchModel

    from onnxsal.metrics.randomisation_mprt import SmoothMPRT, model_explainer

    net, engine, x, t, explain_onnx, maps = setup
    onnx_model = engine.source_model
    twin = _randomised_twin(net, onnx_model, seed=0)
    samples = 8
    # onnxsal's standard normal draws (image i from (seed, i)), handed to Quantus's randn
    z = np.stack([np.random.default_rng([0, i]).standard_normal((samples - 1,) + x.shape[1:])
                  for i in range(len(x))])
    calls = []

    def randn(*shape):
        assert shape == x.shape
        calls.append(1)
        return z[:, (len(calls) - 1) % (samples - 1)]

    def generator(self, order="top_down", seed=42):
        for name in ("0", "3"):
            yield name, twin

    monkeypatch.setattr(PyTorchModel, "get_random_layer_generator", generator)
    monkeypatch.setattr(np.random, "randn", randn)
    ref = quantus.SmoothMPRT(nr_samples=samples, return_last_correlation=True, disable_warnings=True)(
        model=net, x_batch=x, y_batch=t, a_batch=None, explain_func=explain_torch, batch_size=len(x))
    monkeypatch.undo()
    assert len(calls) % (samples - 1) == 0 and calls
    got = SmoothMPRT(onnx_model, model_explainer("vanilla", threads=1, use_disk_cache=False),
                     samples=samples).evaluate(engine.logits, x, maps)["value"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert (got < 0.9).all()
