"""Established methods against captum on the same torch models (docs/definitions.md#method-defaults).

Models: torchvision ResNet-18 (10 classes, seeded, 64x64 so that layer4 is 2x2) and a small
ReLU CNN with max pooling. Differences are relative to the oracle's largest magnitude.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from captum import attr as captum_attr  # noqa: E402  (dev extra)

from onnxsal import methods
from onnxsal.engine import Engine

from conftest import export_torch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # captum's requires_grad notes


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def check(key: str, got, want, tol: float) -> None:
    d = rel_diff(got, want)
    assert d < tol, (key, d)


def make_engine(model) -> Engine:
    return Engine(model, device="cpu", threads=1, use_disk_cache=False)


@pytest.fixture(scope="module")
def resnet():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    # non-trivial batch-norm statistics so that the affine part matters
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    return net, make_engine(export_torch(net, torch.from_numpy(x[:1]))), x


class SmallCNN(torch.nn.Module):
    """Conv, ReLU, max pooling and linear layers only (LRP = gradient x input as eps -> 0)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.r1 = torch.nn.ReLU()
        self.p1 = torch.nn.MaxPool2d(2)
        self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.r2 = torch.nn.ReLU()
        self.p2 = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(16 * 4 * 4, 32)
        self.r3 = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(32, 6)

    def forward(self, x):
        x = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.fc2(self.r3(self.fc1(torch.flatten(x, 1))))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(3)
    net = SmallCNN().eval()
    x = np.random.default_rng(2).random((3, 3, 16, 16), dtype=np.float32)
    return net, make_engine(export_torch(net, torch.from_numpy(x[:1]))), x


def predicted(net, x) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(1).numpy()


# ---------------------------------------------------------------------------------------


def test_gradient_x_input_and_vanilla(resnet):
    net, eng, x = resnet
    t = predicted(net, x)
    res = methods.compute(eng, x, ["vanilla", "gradient_x_input"])
    np.testing.assert_array_equal(res["vanilla"].targets, t)
    want = captum_attr.InputXGradient(net).attribute(torch.from_numpy(x), target=t.tolist())
    check("gradient_x_input (resnet18)", res["gradient_x_input"].raw, want.detach().numpy(), 1e-4)
    sal = captum_attr.Saliency(net).attribute(torch.from_numpy(x), target=t.tolist(), abs=False)
    check("vanilla (resnet18)", res["vanilla"].raw, sal.numpy(), 1e-4)
    np.testing.assert_allclose(res["vanilla"].maps, res["vanilla"].raw.sum(1), rtol=1e-6)
    assert res["gradient_x_input"].signed and res["vanilla"].signed


# alpha = 0.5 lies (within 1e-6) on a ReLU kink of image 0 of this model, where float
# rounding decides which side torch and onnxruntime land on; the step counts avoid that node
@pytest.mark.parametrize("rule,steps", [("left", 7), ("right", 7), ("middle", 8),
                                        ("trapezoid", 8), ("gausslegendre", 8)])
def test_integrated_gradients_rules(resnet, rule, steps):
    net, eng, x = resnet
    res = methods.get("integrated_gradients")(eng, x, steps=steps, rule=rule)
    cap = "gausslegendre" if rule == "gausslegendre" else f"riemann_{rule}"
    ig = captum_attr.IntegratedGradients(net)
    want = ig.attribute(torch.from_numpy(x), baselines=0.0, target=res.targets.tolist(),
                        n_steps=steps, method=cap).detach().numpy()
    got = res.raw
    if rule == "trapezoid":
        # captum's trapezoid weights are 1/n (halved at the ends), summing to (n-1)/n; the
        # trapezoid rule on linspace(0, 1, n) has spacing 1/(n-1): ours is captum's * n/(n-1)
        got = got * (steps - 1) / steps
    check(f"integrated_gradients {rule}, {steps} steps (resnet18)", got, want, 1e-4)


def test_integrated_gradients_completeness_200_steps(resnet, cnn):
    net, eng, x = resnet
    x = x[:1]
    res = methods.get("integrated_gradients")(eng, x, steps=200)  # default rule: middle
    rel = res.info["relative_completeness_error"]
    assert rel.max() < 0.01, rel
    # the error is computed, not assumed: sum(attr) - (S(x) - S(x')), with S from torch
    with torch.no_grad():
        s = net(torch.from_numpy(np.concatenate([x, np.zeros_like(x)]))).double().numpy()
    gap = s[0, res.targets[0]] - s[1, res.targets[0]]
    np.testing.assert_allclose(res.info["score_gap"], [gap], rtol=1e-4)
    np.testing.assert_allclose(res.info["completeness_error"],
                               res.raw.reshape(1, -1).sum(1, dtype=np.float64) - gap,
                               atol=1e-4 * abs(gap))
    # with two left-Riemann steps the error is measurably larger (the report is not a constant)
    net, eng, x = cnn
    coarse = methods.get("integrated_gradients")(eng, x, steps=2, rule="left")
    assert coarse.info["relative_completeness_error"].max() > 0.01


def test_smoothgrad_same_noise_as_captum(resnet):
    net, eng, x = resnet
    samples, level, seed = 6, 0.15, 7
    res = methods.get("smoothgrad")(eng, x, samples=samples, noise_level=level, seed=seed)
    # the noise, rebuilt from the documented recipe, fed to captum's NoiseTunnel
    rng = np.random.default_rng(seed)
    noise = np.concatenate([rng.standard_normal((samples,) + x.shape[1:], dtype=np.float32)
                            * np.float32(level * (x[i].max() - x[i].min()))
                            for i in range(len(x))])
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(net))
    with mock.patch("torch.normal", lambda mean, std: torch.from_numpy(noise)):
        want = nt.attribute(torch.from_numpy(x), nt_type="smoothgrad", nt_samples=samples,
                            stdevs=1.0, target=res.targets.tolist(), abs=False)
    check(f"smoothgrad, {samples} samples (resnet18)", res.raw, want.numpy(), 1e-4)
    # a different seed gives a different map
    other = methods.get("smoothgrad")(eng, x, samples=samples, seed=seed + 1)
    assert rel_diff(other.raw, want.numpy()) > 1e-2


def _captum_gradcam(net, layer, x, targets, size):
    lgc = captum_attr.LayerGradCam(net, layer)
    a = lgc.attribute(torch.from_numpy(x), target=targets.tolist())
    up = captum_attr.LayerAttribution.interpolate(a, size, interpolate_mode="bilinear")
    return a[:, 0].detach().numpy(), up[:, 0].detach().numpy()


def test_gradcam_default_layer_and_named_layer(resnet):
    net, eng, x = resnet
    res = methods.get("gradcam")(eng, x)
    assert res.info["layer"] == eng.default_cam_layer()
    assert res.info["layer_shape"] == [512, 2, 2]
    coarse, up = _captum_gradcam(net, net.layer4, x, res.targets, (64, 64))
    check("gradcam coarse, default layer = layer4 (resnet18)", res.raw, coarse, 1e-4)
    check("gradcam upsampled to 64x64, layer4 (resnet18)", res.maps, up, 1e-4)
    assert not res.signed and res.maps.min() >= 0
    # override by tensor name: the output of layer3
    names = [n.output[0] for n in eng.model.graph.node
             if n.op_type == "Relu" and n.name.startswith("/layer3/")]
    res3 = methods.get("gradcam")(eng, x, layer=names[-1])
    assert res3.info["layer_shape"] == [256, 4, 4]
    coarse3, up3 = _captum_gradcam(net, net.layer3, x, res3.targets, (64, 64))
    check("gradcam upsampled, layer3 by name (resnet18)", res3.maps, up3, 1e-4)


def test_guided_backprop(resnet, cnn):
    for key, (net, eng, x) in {"resnet18": resnet, "small cnn": cnn}.items():
        res = methods.get("guided_backprop")(eng, x)
        want = captum_attr.GuidedBackprop(net).attribute(torch.from_numpy(x),
                                                         target=res.targets.tolist())
        check(f"guided_backprop ({key})", res.raw, want.detach().numpy(), 1e-4)
        vanilla = methods.get("vanilla")(eng, x)
        assert rel_diff(res.raw, vanilla.raw) > 0.05  # the rule set really changed something


@pytest.mark.parametrize("window,stride", [(8, 8), (6, 4)])
def test_occlusion(resnet, window, stride):
    net, eng, x = resnet
    x = x[:1] if stride < window else x  # overlapping windows: one image keeps it fast
    res = methods.get("occlusion")(eng, x, window=window, stride=stride, baseline=0.0)
    occ = captum_attr.Occlusion(net)
    want = occ.attribute(torch.from_numpy(x), sliding_window_shapes=(3, window, window),
                         strides=(3, stride, stride), baselines=0.0,
                         target=res.targets.tolist(), perturbations_per_eval=64)
    want = want.detach().numpy()
    np.testing.assert_allclose(want[:, 0], want[:, 2])  # captum's channels are identical
    check(f"occlusion window {window} stride {stride} (resnet18)", res.maps, want[:, 0], 1e-3)


def test_lrp_tends_to_gradient_x_input(cnn):
    net, eng, x = cnn
    gxi = methods.get("gradient_x_input")(eng, x).raw
    diffs = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-8):
        lrp = methods.get("lrp")(eng, x, epsilon=eps)
        assert lrp.info["epsilon"] == eps
        diffs.append(rel_diff(lrp.raw, gxi))
    assert diffs[0] > 0.1             # a large epsilon really absorbs relevance
    for a, b in zip(diffs, diffs[1:]):
        assert b < a / 5              # shrinks with epsilon (about linearly)
    assert diffs[-1] < 1e-5
    # and gradient x input itself matches captum on this network
    want = captum_attr.InputXGradient(net).attribute(torch.from_numpy(x),
                                                     target=predicted(net, x).tolist())
    check("gradient_x_input (small cnn)", gxi, want.detach().numpy(), 1e-4)
