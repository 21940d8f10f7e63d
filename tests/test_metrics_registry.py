"""Evaluation metrics registered from outside the package: a toy Gini-index metric
(tests/metrics_toy_plugin.py) runs through `onnxsal benchmark --plugin ... --add-metric`,
stores per-image values that match a direct numpy computation on the maps, and resumes
after an interruption; the registry refuses unknown names and clashing classes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxsal import benchmark as bm
from onnxsal import methods, plugins
from onnxsal.cli import cli, main
from onnxsal.data import load_dataset
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.metrics import base as metrics

from test_hostile import save, tiny

PLUGIN_FILE = Path(__file__).with_name("metrics_toy_plugin.py")
PLUGIN_MODULE = "onnxsal_plugin_metrics_toy_plugin"


@pytest.fixture
def restore_registry():
    """Undo the toy plugin's registration, so no other test sees it."""
    metrics.names()
    saved = dict(metrics._REGISTRY), set(plugins._done)
    yield
    metrics._REGISTRY.clear()
    metrics._REGISTRY.update(saved[0])
    plugins._done.clear()
    plugins._done.update(saved[1])
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save(tiny(seed=3, c=1, hw=8, classes=10), tmp_path_factory.mktemp("mr") / "m.onnx"))


def gini(maps: np.ndarray) -> np.ndarray:
    """Gini index of |map| by the mean-absolute-difference definition (an independent form):
    sum_ij |a_i - a_j| / (2 n^2 mean(a))."""
    a = np.abs(maps.astype(np.float64)).reshape(len(maps), -1)
    d = np.abs(a[:, :, None] - a[:, None, :]).sum(axis=(1, 2))
    return d / (2 * a.shape[1] ** 2 * a.mean(axis=1))


def _shard_values(out: Path, d: dict, method: str) -> np.ndarray:
    sdir = out / d["models"][0]["shards"]
    parts = []
    for f in sorted(sdir.glob(f"{method}-*.npz")):
        with np.load(f, allow_pickle=False) as z:
            parts.append(z["toy-gini:value"])
    return np.concatenate(parts)


def test_a_plugin_metric_runs_through_onnxsal_benchmark(restore_registry, model, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["--plugin", str(PLUGIN_FILE), "benchmark", model, "--data", "digits", "--limit",
            "20", "-m", "original,positive", "--shard-size", "8", "--add-metric", "toy-gini",
            "--out", str(out), "--quiet", "--threads", "1", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "toy-gini" in res.output
    d = json.loads((out / "results.json").read_text())
    assert d["settings"]["metrics"] == ["black-white-deletion", "toy-gini"]
    ds = load_dataset("digits", limit=20)
    eng = Engine(model, device="cpu", threads=1, use_disk_cache=False)
    maps = methods.compute(eng, ds.images, ["original", "positive"])
    for r in d["results"]:
        ref = gini(np.asarray(maps[r["method"]].maps))
        got = _shard_values(out, d, r["method"])
        np.testing.assert_allclose(got, ref, rtol=1e-9)
        entry = r["metrics"]["toy-gini"]
        assert entry["direction"] == "higher" and entry["images"] == 20
        assert entry["value"] == pytest.approx(float(np.nanmean(ref)), rel=1e-12)
        assert 0 < entry["value"] < 1
    # black/white deletion is unchanged next to it, and the report has the metric's table
    assert set(d["results"][0]["auc"]) == {"black", "white"}
    assert "toy-gini" in (out / "results.md").read_text()
    toy = sys.modules[PLUGIN_MODULE]
    assert toy.BATCH_SIZES and max(toy.BATCH_SIZES) <= 8  # the base pipeline, per shard


def test_an_interrupted_run_with_a_plugin_metric_resumes(restore_registry, model, tmp_path):
    plugins.load([str(PLUGIN_FILE)])
    kw = dict(methods=["original"], metric="allegiance", limit=24, shard_size=8,
              progress=False, threads=1, device="cpu", metrics_extra=["toy-gini"])
    ref = bm.run_benchmark([model], "digits", out_dir=tmp_path / "ref", **kw)
    out = tmp_path / "run"
    part = bm.run_benchmark([model], "digits", out_dir=out, stop_after=1, **kw)
    assert part == {"complete": False, "shards": 3, "done": 1}
    again = bm.run_benchmark([model], "digits", out_dir=out, **kw)
    assert again["timing"]["shards_computed_this_run"] == 2
    assert again["results"] == ref["results"]
    # a shard that lacks the toy metric's array (written by a run without it) is redone
    shard = min((out / again["models"][0]["shards"]).glob("*.npz"))
    with np.load(shard, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if k != "toy-gini:value"}
    np.savez(shard, **kept)
    third = bm.run_benchmark([model], "digits", out_dir=out, **kw)
    assert third["timing"]["shards_computed_this_run"] == 1
    assert third["results"] == ref["results"]


def test_unknown_metric_is_one_error_line(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["onnxsal", "benchmark", model, "--data", "digits",
                                      "--limit", "4", "--add-metric", "nope", "--out",
                                      str(tmp_path / "o"), "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown metric 'nope'"), err
    assert "black-white-deletion" in err[0]
    assert not (tmp_path / "o" / "shards").exists()


def test_the_registry_names_and_refuses_clashes(restore_registry):
    assert {"black-white-deletion", "deletion", "insertion"} <= set(metrics.names())
    with pytest.raises(OptionError, match="unknown metric"):
        metrics.get("toy-gini")
    with pytest.raises(TypeError, match="already registered"):
        type("Other", (metrics.Metric,), {"name": "deletion"})
    with pytest.raises(TypeError, match="direction"):
        type("Sideways", (metrics.Metric,), {"name": "sideways", "direction": "up"})
