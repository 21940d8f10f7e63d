"""The methods package: registry, one call shape, declared needs, options and errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

from onnxsal import methods
from onnxsal.autodiff.rules.registry import ruleset_names
from onnxsal.engine import Engine
from onnxsal.errors import InputError, OptionError
from onnxsal.methods import NEEDS, Maps

from conftest import export_torch

FAST = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 3},
        "rise": {"masks": 50}, "lime": {"samples": 30},
        "anchor": {"batch_size": 20, "coverage_samples": 200, "max_anchor_size": 2}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5)).eval()
    x = np.random.default_rng(0).random((3, 3, 12, 12), dtype=np.float32)
    eng = Engine(export_torch(net, torch.from_numpy(x[:1])), device="cpu", threads=1,
                 use_disk_cache=False)
    return net, eng, x


def _defined_methods() -> set[str]:
    """Names of the concrete Method subclasses defined in the package's modules."""
    found = set()
    for info in pkgutil.iter_modules(methods.__path__):
        mod = importlib.import_module(f"onnxsal.methods.{info.name}")
        for obj in vars(mod).values():
            if (inspect.isclass(obj) and issubclass(obj, methods.Method)
                    and obj.__module__ == mod.__name__ and obj.__dict__.get("name")):
                found.add(obj.name)
    return found


def test_registry():
    # every method class the package defines is registered, in display order: the five
    # signed maps first (the committed results and figures use this order)
    assert set(methods.names()) >= _defined_methods() >= {"original", "gradcam", "lime"}
    assert methods.names()[:5] == ["original", "positive", "negative", "active", "inactive"]
    rulesets = ruleset_names()
    for name, m in methods.METHODS.items():
        assert m.name == name
        assert m.needs and m.needs <= NEEDS
        assert isinstance(m.signed, bool)
        assert m.rules in rulesets
    assert methods.get("guided").rules == "guided" and methods.get("lrp").rules == "lrp"
    assert methods.get("IG").name == "integrated_gradients"
    assert methods.get("Grad-CAM").name == "gradcam"
    assert methods.get("guided").name == "guided_backprop"
    # 'all': every method that runs without an option the user must give (abele: --autoencoder)
    assert methods.resolve(["all"]) == [n for n in methods.names() if methods.METHODS[n].in_all]
    assert "abele" in methods.names() and "abele" not in methods.resolve(["all"])
    assert methods.resolve(["ig", "integrated-gradients", "lrp"]) == ["integrated_gradients", "lrp"]
    with pytest.raises(OptionError, match="unknown method 'deeplift'"):
        methods.get("deeplift")
    assert methods.get("gradcam").needs == {"intermediate_gradients"}
    assert methods.get("occlusion").needs == {"forward"}


def test_all_methods_one_call_shape(tiny):
    net, eng, x = tiny
    res = methods.compute(eng, x, "all", **FAST)
    assert list(res) == methods.resolve(["all"])
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    for name, m in res.items():
        assert isinstance(m, Maps) and m.method == name
        assert m.maps.shape == (3, 12, 12) and m.maps.dtype == np.float32
        assert np.isfinite(m.maps).all()
        np.testing.assert_array_equal(m.targets, pred)
        assert m.signed == methods.get(name).signed
        if m.raw is not None and m.raw.ndim == 4:
            assert m.raw.shape == x.shape
    # compute() shares work but gives what each method gives alone
    for name in ("original", "active", "gradient_x_input", "lime"):
        alone = methods.get(name)(eng, x, **FAST.get(name, {}))
        np.testing.assert_allclose(alone.maps, res[name].maps, rtol=1e-6, atol=1e-7)


def test_targets_and_single_image(tiny):
    net, eng, x = tiny
    one = methods.get("vanilla")(eng, x[0], targets=2)
    assert one.maps.shape == (1, 12, 12) and one.targets.tolist() == [2]
    xt = torch.from_numpy(x[:1]).requires_grad_(True)
    net(xt)[0, 2].backward()
    np.testing.assert_allclose(one.raw, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    res = methods.compute(eng, x, ["occlusion", "gradcam"], targets=[4, 4, 0])
    assert res["occlusion"].targets.tolist() == [4, 4, 0]
    with pytest.raises(OptionError, match="out of range"):
        methods.compute(eng, x, "vanilla", targets=5)
    with pytest.raises(OptionError, match="one per image"):
        methods.compute(eng, x, "vanilla", targets=[1, 2])


def test_options_and_errors(tiny):
    net, eng, x = tiny
    with pytest.raises(OptionError, match="no option 'stepz'"):
        methods.get("integrated_gradients")(eng, x, stepz=3)
    with pytest.raises(OptionError, match="no selected method has an option 'window'"):
        methods.compute(eng, x, ["vanilla", "rise"], window=3)
    with pytest.raises(OptionError, match="not selected"):
        methods.compute(eng, x, ["vanilla"], lime={"samples": 10})
    with pytest.raises(OptionError, match="integration rule"):
        methods.get("ig")(eng, x, rule="simpson")
    with pytest.raises(OptionError, match="segmentation"):
        methods.get("lime")(eng, x, segmentation="watershed")
    with pytest.raises(OptionError, match="larger than the image"):
        methods.get("occlusion")(eng, x, window=20)
    with pytest.raises(OptionError):
        methods.get("gradcam")(eng, x, layer="no_such_tensor")
    with pytest.raises(InputError, match="shape"):
        methods.get("vanilla")(eng, x[:, :, :10])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        methods.get("vanilla")(eng, x * 255)
    # a common option goes to every selected method that has it
    res = methods.compute(eng, x, ["smoothgrad", "rise"], seed=3, smoothgrad={"samples": 2},
                          rise={"masks": 20})
    assert res["smoothgrad"].info["seed"] == 3 and res["rise"].info["seed"] == 3
