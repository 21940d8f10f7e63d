"""onnxsal compare: prediction and map agreement of two models; `onnxsal convert torch`."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxsal.cli import cli
from onnxsal.compare import compare_models, map_agreement
from onnxsal.errors import OptionError

from conftest import export_torch

nn = torch.nn


def cnn(classes=4, channels=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, classes)).eval()


def save(m, path, shape=(1, 1, 8, 8)):
    onnx.save(export_torch(m, torch.randn(*shape)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    base = cnn()
    a = save(base, d / "a.onnx")
    same = save(base, d / "same.onnx", shape=(3, 1, 8, 8))  # re-exported: a different file
    other = cnn(seed=1)
    b = save(other, d / "b.onnx")
    nudged = cnn()
    with torch.no_grad():
        nudged[7].bias[0] += 1e-3   # logits of class 0 shift by exactly 1e-3
    c = save(nudged, d / "nudged.onnx")
    return {"a": a, "same": same, "b": b, "nudged": c, "dir": d}


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)


def test_same_model(files, x, tmp_path):
    rep = compare_models(files["a"], files["same"], x, ["vanilla", "gradcam", "original"],
                         out=tmp_path, device="cpu", threads=1)
    assert rep["verdict"].startswith("same model")
    assert rep["predictions"]["top1_agreement"] == 1.0
    assert rep["predictions"]["max_abs_logit_diff"] < 1e-5
    for v in rep["methods"].values():
        assert v["spearman_min"] > 0.999 and v["max_abs_diff"] < 1e-5
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["verdict"] == rep["verdict"]
    md = (tmp_path / "compare.md").read_text()
    assert "| vanilla |" in md and "top-1 agreement" in md


def test_nudged_bias_is_measured(files, x):
    """A bias shifted by 1e-3 moves class 0's logit by exactly 1e-3 and no gradient at all."""
    rep = compare_models(files["a"], files["nudged"], x, ["vanilla"], device="cpu", threads=1)
    p = rep["predictions"]
    assert abs(p["max_abs_logit_diff"] - 1e-3) < 1e-5
    assert rep["methods"]["vanilla"]["max_abs_diff"] < 1e-6
    assert "logits differ" in rep["verdict"] or "different predictions" in rep["verdict"]


def test_different_models_differ(files, x):
    rep = compare_models(files["a"], files["b"], x, ["vanilla"], device="cpu", threads=1)
    from onnxsal.engine import Engine

    la = Engine(files["a"], device="cpu").logits(x)
    lb = Engine(files["b"], device="cpu").logits(x)
    assert rep["predictions"]["top1_agreement"] == pytest.approx((la.argmax(1) == lb.argmax(1)).mean())
    assert rep["predictions"]["max_abs_logit_diff"] == pytest.approx(np.abs(la - lb).max(), rel=1e-5)
    assert rep["methods"]["vanilla"]["spearman_mean"] < 0.9
    assert not rep["verdict"].startswith("same model")


def test_map_agreement_oracle():
    rng = np.random.default_rng(0)
    a = rng.random((3, 7, 7))
    b = a.copy()
    b[1] = -a[1]                       # reversed ranking in image 1
    r = map_agreement(a, b)
    assert r["spearman_min"] == pytest.approx(-1.0) and r["worst_image"] == 1
    assert r["max_abs_diff"] == pytest.approx(2 * a[1].max())
    assert r["per_image"]["spearman"][0] == pytest.approx(1.0)


def test_input_space_and_class_count_must_match(files, x, tmp_path):
    wide = save(cnn(classes=5), tmp_path / "k5.onnx")
    with pytest.raises(OptionError, match="class counts"):
        compare_models(files["a"], wide, x, [], device="cpu")
    rgb = save(cnn(channels=3), tmp_path / "rgb.onnx", shape=(1, 3, 8, 8))
    with pytest.raises(OptionError, match="different inputs"):
        compare_models(files["a"], rgb, x, [], device="cpu")


def test_cli_compare(files, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).random((4, 8, 8)).astype(np.float32),
             y=np.array([0, 1, 2, 3]))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compare", files["a"], files["b"], "--data", str(tmp_path / "d.npz"),
                                   "-m", "vanilla,gradient_x_input", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| gradient_x_input |" in res.output and (out / "compare.json").is_file()
    rep = json.loads((out / "compare.json").read_text())
    assert rep["data"]["count"] == 4 and "accuracy_a" in rep["predictions"]


def test_cli_convert_torch_module_function_and_weights(tmp_path, monkeypatch):
    (tmp_path / "torchsrc_tiny.py").write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(5)
            return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(3, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(3, 2))
    with torch.no_grad():
        for p in trained.parameters():
            p.fill_(0.25)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "t.onnx"
    res = CliRunner().invoke(cli, ["convert", "torch", "torchsrc_tiny:build", "--weights",
                                   str(tmp_path / "w.pt"), "--input-shape", "1,6,6", "-o", str(out)])
    assert res.exit_code == 0, res.output
    from onnxsal.engine import Engine

    v = np.random.default_rng(0).random((2, 1, 6, 6), dtype=np.float32)
    with torch.no_grad():
        ref = trained(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(Engine(out, device="cpu").logits(v), ref, atol=1e-5)
    # a torch file alone is weights only: the CLI says to pass module:function
    res = CliRunner().invoke(cli, ["convert", "torch", str(tmp_path / "w.pt"), "-o", str(out)])
    assert res.exit_code != 0 and "module:function" in str(res.exception)
    # a pickled module is refused by weights_only loading
    torch.save(trained, tmp_path / "whole.pt")
    res = CliRunner().invoke(cli, ["convert", "torch", "torchsrc_tiny:build", "--weights",
                                   str(tmp_path / "whole.pt"), "--input-shape", "1,6,6", "-o", str(out)])
    assert res.exit_code != 0 and "weights_only" in str(res.exception)
