"""The CLI: inspect, augment and explain on a small exported CNN; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxsal.cli import cli

from conftest import export_torch

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(6, 3), nn.Softmax(dim=1)).eval()
    path = tmp_path_factory.mktemp("m") / "cnn.onnx"
    onnx.save(export_torch(m, torch.randn(1, 3, 16, 16)), str(path))
    return path


def test_inspect_json(model_file):
    res = CliRunner().invoke(cli, ["inspect", str(model_file), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["input"]["layout"] == "NCHW" and d["input"]["shape"][1:] == [3, 16, 16]
    assert d["logits"]["after"] == "Softmax" and d["logits"]["num_classes"] == 3
    assert d["operators"]["Conv"] == {"count": 2, "differentiable": True, "needs_rule": True}


def test_augment_writes_a_model_onnxruntime_runs(model_file, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "cnn.grad.onnx"
    res = CliRunner().invoke(cli, ["augment", str(model_file), "-o", str(out)])
    assert res.exit_code == 0, res.output
    aug = onnx.load(str(out))
    onnx.checker.check_model(aug, full_check=True)
    meta = {p.key: p.value for p in aug.metadata_props}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    seed = np.repeat(np.eye(3, dtype=np.float32)[:, None], 2, axis=1)
    g = sess.run([meta["onnxsal.grad.x"]], {"x": x, meta["onnxsal.seed"]: seed})[0]
    assert g.shape == (3, 2, 3, 16, 16) and np.abs(g).max() > 0


def test_explain_writes_figures_maps_and_predictions(model_file, tmp_path):
    from skimage import io

    img = (np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)
    io.imsave(tmp_path / "a.png", img)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["explain", str(model_file), str(tmp_path / "a.png"), "-m", "vanilla,positive",
                                   "-m", "active", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "a.png").is_file()
    maps = np.load(out / "maps.npz")
    assert sorted(maps.files) == ["a/active", "a/positive", "a/vanilla"]
    assert maps["a/vanilla"].shape == (16, 16)
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["images"][0]["figure"] == "a.png" and pred["methods"] == ["vanilla", "positive", "active"]


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "no such model file"),
    (["explain", "{model}", "nothing-here", "--out", "{tmp}"], "no such file or folder"),
    (["explain", "{model}", "digits", "-m", "nonsense", "--out", "{tmp}"], "unknown method"),
])
def test_user_errors_are_one_line(model_file, tmp_path, args, message):
    args = [a.format(model=model_file, tmp=tmp_path) for a in args]
    p = subprocess.run([sys.executable, "-m", "onnxsal.cli", *args], capture_output=True, text=True)
    assert p.returncode == 2
    errors = [line for line in p.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], p.stderr
    assert "Traceback" not in p.stderr
