"""Methods and rule sets registered from outside the package: the toy plugin
(tests/methods_toy_plugin.py) runs through methods.compute, `onnxsal explain` and
`onnxsal augment --rules` with no edit of the package; registration errors; entry points."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxsal import methods, plugins
from onnxsal.autodiff.rules import registry as rules_registry
from onnxsal.cli import cli, main
from onnxsal.engine import Engine
from onnxsal.methods import NEEDS, Method, registry

from conftest import export_torch, run_augmented

PLUGIN_FILE = Path(__file__).with_name("methods_toy_plugin.py")
TOY = ["toy_deconvnet", "toy_deconvnet_abs"]


@pytest.fixture
def restore_registries():
    """Undo every registration a test makes, so no other test sees the toy methods."""
    rules_registry.ruleset_names()  # the built-in rule modules are imported before the snapshot
    saved = (dict(registry.METHODS), dict(registry.ALIASES),
             {k: dict(v) for k, v in rules_registry.RULESETS.items()}, set(plugins._done),
             set(sys.modules))
    yield
    for d, old in zip((registry.METHODS, registry.ALIASES), saved[:2]):
        d.clear()
        d.update(old)
    rules_registry.DEFAULT.clear()  # in place: the pass and the other rule sets refer to it
    rules_registry.DEFAULT.update(saved[2]["default"])
    rules_registry.RULESETS.clear()
    rules_registry.RULESETS.update((k, rules_registry.DEFAULT if k == "default" else v)
                                   for k, v in saved[2].items())
    plugins._done.clear()
    plugins._done.update(saved[3])
    for name in set(sys.modules) - saved[4]:
        if "toy_plugin" in name:
            del sys.modules[name]


@pytest.fixture
def toy(restore_registries):
    return importlib.import_module("methods_toy_plugin")


@pytest.fixture(scope="module")
def net_and_model(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(6, 4)).eval()
    x = np.random.default_rng(0).random((2, 3, 12, 12), dtype=np.float32)
    path = tmp_path_factory.mktemp("m") / "net.onnx"
    onnx.save(export_torch(net, torch.from_numpy(x[:1])), str(path))
    return net, path, x


def deconvnet_oracle(net, x, targets):
    """torch autograd with the deconvnet rule at every ReLU: d/dx S_target."""
    hooks = [m.register_full_backward_hook(lambda mod, gin, gout: (torch.relu(gout[0]),))
             for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        xt = torch.from_numpy(x).requires_grad_(True)
        out = net(xt)
        out[torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
        return xt.grad.numpy()
    finally:
        for h in hooks:
            h.remove()


def test_a_plugin_method_runs_through_compute(toy, net_and_model):
    net, path, x = net_and_model
    assert methods.names()[-2:] == TOY  # after the built-in methods, in definition order
    assert methods.get("toy-deconv").name == "toy_deconvnet"
    assert "toy_deconvnet" in rules_registry.ruleset_names()
    eng = Engine(onnx.load(str(path)), device="cpu", threads=1, use_disk_cache=False)
    toy.GROUP_CALLS.clear()
    res = methods.compute(eng, x, ["toy_deconvnet", "vanilla", "toy_deconvnet_abs"])
    assert list(res) == ["toy_deconvnet", "vanilla", "toy_deconvnet_abs"]
    assert toy.GROUP_CALLS == [TOY]  # one call for the group, from the declared group
    ref = deconvnet_oracle(net, x, res["vanilla"].targets)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(res["toy_deconvnet"].raw, ref, atol=1e-5 * scale)
    np.testing.assert_allclose(res["toy_deconvnet_abs"].maps, np.abs(ref).max(1), atol=1e-5 * scale)
    assert res["toy_deconvnet"].signed and not res["toy_deconvnet_abs"].signed
    # the plain gradient is untouched by the rule set (and differs from the deconvnet one)
    xt = torch.from_numpy(x).requires_grad_(True)
    net(xt)[torch.arange(2), torch.as_tensor(res["vanilla"].targets)].sum().backward()
    np.testing.assert_allclose(res["vanilla"].raw, xt.grad.numpy(), atol=1e-5 * scale)
    assert np.abs(xt.grad.numpy() - ref).max() > 1e-3 * scale
    # members given different options are not grouped; each gives what it gives alone
    toy.GROUP_CALLS.clear()
    res2 = methods.compute(eng, x, TOY, toy_deconvnet={"scale": 2.0})
    assert toy.GROUP_CALLS == [["toy_deconvnet"], ["toy_deconvnet_abs"]]
    np.testing.assert_allclose(res2["toy_deconvnet"].raw, 2 * res["toy_deconvnet"].raw, rtol=1e-6)
    alone = methods.get("toy_deconvnet_abs")(eng, x)
    np.testing.assert_array_equal(alone.maps, res["toy_deconvnet_abs"].maps)


def test_a_plugin_method_runs_through_onnxsal_explain(restore_registries, net_and_model,
                                                      tmp_path, monkeypatch):
    net, path, x = net_and_model
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))
    u8 = np.round(x * 255).astype(np.uint8)
    np.savez(tmp_path / "imgs.npz", x=u8, names=np.array(["a", "b"]))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["--plugin", str(PLUGIN_FILE), "explain", str(path),
                                   str(tmp_path / "imgs.npz"), "-m", "toy_deconv,vanilla",
                                   "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["methods"] == ["toy_deconvnet", "vanilla"]
    maps = np.load(out / "maps.npz")
    targets = [im["target"] for im in pred["images"]]
    ref = deconvnet_oracle(net, u8.astype(np.float32) / 255, targets).sum(axis=1)
    for i, name in enumerate("ab"):
        np.testing.assert_allclose(maps[f"{name}/toy_deconvnet"], ref[i],
                                   atol=1e-5 * np.abs(ref).max())
    # -m all includes the plugin's methods
    res = CliRunner().invoke(cli, ["--plugin", str(PLUGIN_FILE), "explain", str(path),
                                   str(tmp_path / "imgs.npz"), "-m", "all", "--out",
                                   str(tmp_path / "all"), "--device", "cpu", "--limit", "1"])
    assert res.exit_code == 0, res.output
    names = json.loads((tmp_path / "all" / "predictions.json").read_text())["methods"]
    assert names[:5] == ["original", "positive", "negative", "active", "inactive"]
    assert names[-2:] == TOY
    # gradient models of the built-in rules are cached on disk, those of a plugin's rules not
    cached = [{p.key: p.value for p in onnx.load(str(f)).metadata_props}.get("onnxsal.rules")
              for f in (tmp_path / "cache").rglob("*.onnx")]
    assert "default" in cached and "guided" in cached and "toy_deconvnet" not in cached


def test_a_plugin_rule_set_runs_through_onnxsal_augment(restore_registries, net_and_model,
                                                        tmp_path):
    net, path, x = net_and_model
    out = tmp_path / "aug.onnx"
    res = CliRunner().invoke(cli, ["--plugin", str(PLUGIN_FILE), "augment", str(path), "-o",
                                   str(out), "--rules", "toy_deconvnet"])
    assert res.exit_code == 0, res.output
    aug = onnx.load(str(out))
    assert {p.key: p.value for p in aug.metadata_props}["onnxsal.rules"] == "toy_deconvnet"
    seed = np.zeros((1, 2, 4), np.float32)
    seed[0, [0, 1], [1, 3]] = 1
    _, grads = run_augmented(aug, x, seed)
    ref = deconvnet_oracle(net, x, [1, 3])
    np.testing.assert_allclose(grads["x"][0], ref, atol=1e-5 * np.abs(ref).max())


def test_unknown_rule_set_and_plugin_are_one_line_errors(restore_registries, net_and_model,
                                                         tmp_path, monkeypatch, capsys):
    _, path, _ = net_and_model
    for argv, message in [
        (["--plugin", str(PLUGIN_FILE), "augment", str(path), "-o", str(tmp_path / "o.onnx"),
          "--rules", "nope"],
         "unknown rule set 'nope' (choose from: default, guided, lrp, toy_deconvnet)"),
        (["--plugin", "no_such_plugin_module", "inspect", str(path)],
         "plugin 'no_such_plugin_module' could not be loaded: ModuleNotFoundError"),
    ]:
        monkeypatch.setattr(sys, "argv", ["onnxsal", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_registration_errors(restore_registries):
    with pytest.raises(TypeError, match="already registered"):
        type("Again", (Method,), {"name": "vanilla", "needs": frozenset({"gradients"})})
    with pytest.raises(TypeError, match="alias 'ig' .* already used by 'integrated_gradients'"):
        type("Clash", (Method,), {"name": "clash", "aliases": ("IG",),
                                  "needs": frozenset({"gradients"})})
    with pytest.raises(TypeError, match="must declare needs"):
        type("NoNeeds", (Method,), {"name": "no_needs"})
    with pytest.raises(TypeError, match="must declare needs"):
        type("BadNeeds", (Method,), {"name": "bad_needs", "needs": frozenset({"telepathy"})})
    with pytest.raises(TypeError, match="lower case"):
        type("Caps", (Method,), {"name": "Caps", "needs": NEEDS})
    assert "clash" not in methods.names() and "no_needs" not in methods.names()
    # a class without its own name is abstract: not registered
    before = methods.names()
    type("Abstract", (Method,), {"needs": frozenset({"forward"})})
    assert methods.names() == before


def test_entry_point_plugins_load_on_import(tmp_path):
    """An installed distribution's `onnxsal.plugins` entry point registers its methods."""
    (tmp_path / "toy_plugin_dist-0.1.dist-info").mkdir()
    (tmp_path / "toy_plugin_dist-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toy-plugin-dist\nVersion: 0.1\n")
    (tmp_path / "toy_plugin_dist-0.1.dist-info" / "entry_points.txt").write_text(
        "[onnxsal.plugins]\ntoy = methods_toy_plugin\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(PLUGIN_FILE.parent), os.environ.get("PYTHONPATH", "")]))
    code = ("from onnxsal import methods; from onnxsal.autodiff.rules import registry; "
            "print(methods.names()[-2:], registry.ruleset_names()[-1])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{TOY} toy_deconvnet"
