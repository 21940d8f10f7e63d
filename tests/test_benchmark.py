"""The benchmark driver: result files, atomic shards, resuming after an interruption, and a
real (tiny) model on a few hundred digits checked against torch and a loop oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxsal.benchmark import run_benchmark
from onnxsal.data import load_dataset
from onnxsal.errors import InputError, OptionError
from onnxsal.metrics.deletion import FRACTIONS, auc

METHODS = ["original", "positive", "negative"]


class FakeEngine:
    """A linear 'model' on 8x8 grey images: logits = x W (enough to drive the driver)."""

    def __init__(self, name: str):
        seed = sum(map(ord, name))
        self.W = np.random.default_rng(seed).normal(size=(64, 10)).astype(np.float32)
        self.input_shape = (1, 8, 8)
        self.num_classes = 10
        self.model_hash = f"fake-{seed}"
        self.preprocess = None
        self.provider = "fake"

    def logits(self, x):
        return x.reshape(len(x), -1) @ self.W


def fake_maps(engine, method, x):
    g = engine.W[:, engine.logits(x).argmax(1)].T.reshape(-1, 8, 8)
    return {"original": np.abs(g), "positive": np.maximum(g, 0), "negative": np.maximum(-g, 0)}[method]


def _run(out, **kw):
    args = dict(models=["a.onnx", "b.onnx"], data="digits", methods=METHODS, metric="accuracy",
                limit=120, out_dir=out, maps_fn=fake_maps, engine_factory=FakeEngine,
                shard_size=50, progress=False)
    args.update(kw)
    return run_benchmark(**args)


def _stable(path: Path) -> dict:
    d = json.loads((path / "results.json").read_text())
    d.pop("timing")
    return d


def test_result_files(tmp_path):
    res = _run(tmp_path)
    for f in ("results.json", "results.md", "curves.csv", "curves.png"):
        assert (tmp_path / f).stat().st_size > 0
    d = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in d["models"]] == ["a", "b"]
    assert len(d["results"]) == 6 and d["settings"]["methods"] == METHODS
    assert d["data"]["count"] == 120 and d["data"]["notes"] == []
    assert {"numpy", "onnx", "python"} <= set(d["versions"])
    # the curves and AUCs agree with a direct evaluation of the saved per-image predictions
    r = next(r for r in d["results"] if r["model"] == "b" and r["method"] == "positive")
    assert r["auc"]["black"] == pytest.approx(auc(r["curves"]["black"]))
    assert r["fractions"] == list(FRACTIONS)
    md = (tmp_path / "results.md").read_text()
    assert "| method | a black | a white | b black | b white |" in md
    csv_lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 3 * 2 * 10
    # the clean accuracy is the model's accuracy on the images
    ds = load_dataset("digits", limit=120)
    eng = FakeEngine("a.onnx")
    acc = float(np.mean(eng.logits(ds.images).argmax(1) == ds.labels))
    assert d["models"][0]["clean"]["score"] == pytest.approx(acc)
    assert r["curves"]["black"][0] == pytest.approx(
        float(np.mean(FakeEngine("b.onnx").logits(ds.images).argmax(1) == ds.labels)))
    assert res["complete"]


def test_interrupted_run_resumes_to_identical_results(tmp_path):
    full = tmp_path / "full"
    part = tmp_path / "part"
    _run(full)

    calls = {"n": 0}

    def interrupting_maps(engine, method, x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the fifth shard
        return fake_maps(engine, method, x)

    interrupting_maps.__qualname__ = fake_maps.__qualname__  # the same maps: same shard key
    with pytest.raises(KeyboardInterrupt):
        _run(part, maps_fn=interrupting_maps)
    shards = sorted(part.glob("shards/*/*.npz"))
    assert len(shards) == 4
    assert not (part / "results.json").exists()
    assert not list(part.rglob("*.tmp"))  # nothing half-written
    # a stray temporary file from a crash and a damaged shard do not matter
    (shards[0].parent / ".x.npz.tmp").write_bytes(b"junk")
    shards[1].write_bytes(b"truncated")
    res = _run(part)
    assert res["timing"]["shards_computed_this_run"] == 18 - 3
    assert _stable(part) == _stable(full)
    for f in ("results.md", "curves.csv", "curves.png"):
        assert (part / f).read_bytes() == (full / f).read_bytes()


def test_stop_after_leaves_no_results_and_a_rerun_is_deterministic(tmp_path):
    r = _run(tmp_path, stop_after=2)
    assert r == {"complete": False, "shards": 18, "done": 2}
    assert not (tmp_path / "results.json").exists()
    again = _run(tmp_path)
    assert again["timing"]["shards_computed_this_run"] == 16
    fresh = tmp_path / "fresh"
    _run(fresh)
    assert _stable(fresh) == _stable(tmp_path)


def test_changed_settings_do_not_reuse_shards(tmp_path):
    _run(tmp_path)
    res = _run(tmp_path, metric="allegiance")
    assert res["timing"]["shards_computed_this_run"] == 18
    assert len(list(tmp_path.glob("shards/*"))) == 4  # 2 models x 2 settings
    assert all(r["curves"]["black"][0] == 1.0 for r in res["results"])


def test_rise_deletion_and_insertion_in_the_benchmark(tmp_path):
    from onnxsal.metrics.rise import RiseDeletion, RiseInsertion

    res = _run(tmp_path, models=["a.onnx"], limit=60, rise=True, rise_baseline="mean")
    ds = load_dataset("digits", limit=60)
    eng = FakeEngine("a.onnx")
    maps = fake_maps(eng, "positive", ds.images)
    r = next(r for r in res["results"] if r["method"] == "positive")
    direct_del = RiseDeletion(baseline="mean")(eng.logits, ds.images, maps)
    direct_ins = RiseInsertion()(eng.logits, ds.images, maps)
    assert r["rise"]["deletion"]["auc"] == pytest.approx(direct_del.auc, rel=1e-12)
    assert r["rise"]["insertion"]["auc"] == pytest.approx(direct_ins.auc, rel=1e-12)
    assert len(r["rise"]["deletion"]["x"]) == 8 + 1  # one image row (8 px) per step
    md = (tmp_path / "results.md").read_text()
    assert "| method | a deletion | a insertion |" in md
    assert "rise-insertion" in (tmp_path / "curves.csv").read_text()
    # black/white results are unchanged by adding RISE
    plain = _run(tmp_path / "plain", models=["a.onnx"], limit=60)
    assert [x["auc"] for x in plain["results"]] == [x["auc"] for x in res["results"]]


def test_user_errors(tmp_path):
    with pytest.raises(OptionError, match="allegiance"):
        _run(tmp_path, data="skimage-samples", limit=None)
    with pytest.raises(OptionError, match="no methods"):
        _run(tmp_path, methods=[" , "])
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 12]))
    with pytest.raises(InputError, match="out of range"):
        _run(tmp_path, data=str(tmp_path / "d.npz"))


# ---------------------------------------------------------------------------------------------
# a real model


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A tiny CNN trained on the 8x8 digits for a few seconds, exported to ONNX."""
    import onnx
    import torch

    from conftest import export_torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = load_dataset("digits")
    x, y = torch.tensor(d.images), torch.tensor(d.labels)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(15):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    path = tmp_path_factory.mktemp("model") / "digits_cnn.onnx"
    onnx.save(export_torch(net, x[:2]), str(path))
    return net, path


def _engine(path):
    from onnxsal.engine import Engine

    return Engine(path, threads=1, use_disk_cache=False)


def test_real_model_on_300_digits_matches_torch_and_a_loop_oracle(tmp_path, digits_model):
    import torch

    net, path = digits_model
    res = run_benchmark([path], "digits", ["original", "positive", "negative", "active",
                                            "inactive"], "accuracy", 300, tmp_path,
                        engine_factory=_engine, progress=False, shard_size=128)
    assert res["complete"] and len(res["results"]) == 5
    ds = load_dataset("digits", limit=300)
    x = torch.tensor(ds.images, requires_grad=True)
    logits = net(x)
    pred = logits.argmax(1)
    clean_acc = float((pred.numpy() == ds.labels).mean())
    assert clean_acc > 0.6  # the model learned something
    assert res["models"][0]["clean"]["score"] == pytest.approx(clean_acc, abs=2 / 300)
    # positive map from torch autograd: max(dS_c/dx, 0) (one channel)
    g = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), x)[0].numpy()[:, 0]
    pos = np.maximum(g, 0)
    curves = {}
    with torch.no_grad():
        for mode, fill in (("black", 0.0), ("white", 1.0)):
            curve = []
            for p in FRACTIONS:
                imgs = ds.images.copy()
                for i in range(len(imgs)):
                    v = sorted(pos[i].ravel().tolist(), reverse=True)[round(p * 64)]
                    imgs[i, :, (pos[i] > v) & (pos[i] != 0)] = fill
                curve.append(float((net(torch.tensor(imgs)).argmax(1).numpy() == ds.labels).mean()))
            curves[mode] = curve
    r = next(r for r in res["results"] if r["method"] == "positive")
    for mode in ("black", "white"):
        assert r["auc"][mode] == pytest.approx(auc(curves[mode]), abs=0.01)
    # the paper's reading holds on this model: positive deletes support, negative opposition
    aucs = {r["method"]: r["auc"] for r in res["results"]}
    assert aucs["positive"]["black"] < aucs["negative"]["black"]
    assert aucs["negative"]["white"] < aucs["positive"]["white"]


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", ONNXSAL_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "onnxsal.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_benchmark(tmp_path, digits_model):
    _, path = digits_model
    p = _cli("benchmark", str(path), "--data", "digits", "--limit", "60", "--out", "o",
             "-m", "original,positive", "--methods", "negative", "--threads", "1", "--quiet",
             "--rise", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| original |" in p.stdout and "wrote o/results.json" in p.stdout
    assert "| method | digits_cnn deletion | digits_cnn insertion |" in p.stdout
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["settings"]["methods"] == ["original", "positive", "negative"]
    bad = _cli("benchmark", str(path), "--data", "skimage-samples", "--out", "o2", "--quiet",
               cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "allegiance" in bad.stderr
