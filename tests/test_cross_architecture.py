"""benchmarks/cross_architecture.py's evaluate step on a tiny setting: two small random-weight
models, two methods, two metrics, eight images. The Markdown tables must show the JSON's values,
the JSON's values must equal the metric called directly, the ranking must follow the values and
a second run must reuse the per-model parts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from benchmarks import cross_architecture as xa
from onnxsal import methods as M
from onnxsal.engine import Engine
from onnxsal.metrics import base

METHODS = ["vanilla", "gradient_x_input"]
METRICS = ["sparseness", "region-perturbation-morf"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from torch import nn

    from converters.torch_export import export

    tmp = tmp_path_factory.mktemp("xa")
    torch.manual_seed(0)
    models = {
        "tiny_mlp": nn.Sequential(nn.Flatten(1), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)),
        "tiny_cnn": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(1), nn.Linear(8, 10)),
    }
    paths = {}
    for name, m in models.items():
        paths[name] = tmp / f"{name}.onnx"
        export(m.eval(), (1, 28, 28), paths[name], opset=17, dynamo=False, preprocess=xa.PREPROCESS)
    argv = ["evaluate", "--models", ",".join(f"{k}={v}" for k, v in paths.items()), "--metrics",
            ",".join(METRICS), "--images", "8", "--out", str(tmp / "out")]
    xa.main(argv + ["--methods", METHODS[0]])  # a first run with one method: the second resumes
    first = json.loads((tmp / "out" / "results.json").read_text())
    xa.main(argv + ["--methods", ",".join(METHODS)])
    return tmp / "out", paths, argv + ["--methods", ",".join(METHODS)], first


def table(readme: str, model: str) -> dict[str, dict[str, str]]:
    """{method: {column: cell}} of the README's table for ``model``."""
    part = readme.split(f"\n## {model}\n", 1)[1].strip().split("\n\n")[0].splitlines()
    cols = [re.sub(r" [↑↓]$", "", c.strip()) for c in part[0].strip("|").split("|")][1:]
    rows = {}
    for line in part[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(cols, cells[1:], strict=True))
    return rows


def test_tables_match_the_json_and_the_metric_called_directly(run):
    out, paths, _, _ = run
    res = json.loads((out / "results.json").read_text())
    readme = (out / "README.md").read_text()
    assert set(res["models"]) == set(paths)
    x, y, idx = xa.sample(8, 0)
    assert res["setup"]["test_indices"] == idx.tolist()
    for name, path in paths.items():
        entry = res["models"][name]
        assert set(entry["metrics"]) == set(METRICS)
        rows = table(readme, name)
        assert set(rows) == set(METHODS)
        eng = Engine(str(path), device="cpu", threads=1, use_disk_cache=False)
        for meth in METHODS:
            maps = M.compute(eng, x, [meth])[meth].maps
            for k in METRICS:
                d = entry["metrics"][k][meth]
                assert d["direction"] == base.get(k).direction
                direct = base.get(k).from_options({})(eng.logits, x, maps, y)["value"]
                assert d["value"] == pytest.approx(direct, rel=1e-6, abs=1e-9)
                assert rows[meth][k] == xa.fmt(d["value"])
                lo, hi = d["ci95"]
                assert lo <= d["value"] <= hi


def test_ranking_follows_the_values(run):
    out, paths, _, _ = run
    res = json.loads((out / "results.json").read_text())
    for k in METRICS:
        a = res["analysis"][k]
        higher = base.get(k).direction == "higher"
        per_model = {}
        for name in paths:
            vals = {m: res["models"][name]["metrics"][k][m]["value"] for m in METHODS}
            best = (max if higher else min)(vals, key=vals.get)
            assert a["winner_per_model"][name] == best
            per_model[name] = {m: 1.0 if m == best else 2.0 for m in METHODS}
        for m in METHODS:
            assert a["mean_rank"][m] == pytest.approx(np.mean([per_model[n][m] for n in paths]))
    assert (out / "ranking.png").stat().st_size > 0


def test_a_run_with_more_methods_keeps_the_methods_done(run):
    out, paths, _, first = run
    res = json.loads((out / "results.json").read_text())
    for name in paths:
        assert list(first["models"][name]["methods"]) == METHODS[:1]
        for k in METRICS:
            assert res["models"][name]["metrics"][k][METHODS[0]] == first["models"][name]["metrics"][k][METHODS[0]]
            assert set(res["models"][name]["metrics"][k]) == set(METHODS)


def test_a_second_run_reuses_the_parts(run, capsys):
    out, _, argv, _ = run
    before = (out / "results.json").read_text()
    xa.main(argv)
    assert capsys.readouterr().out.count("reusing") == 2
    after = json.loads((out / "results.json").read_text())
    assert after["models"] == json.loads(before)["models"]


def test_add_scores_a_new_column_and_keeps_the_others(run, tmp_path):
    import shutil

    src, paths, _, _ = run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = json.loads((out / "results.json").read_text())
    xa.main(["add", "--metrics", "input-invariance", "--models", "tiny_cnn", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["setup"]["added"] == [{"models": "tiny_cnn", "metrics": "input-invariance"}]
    assert "add --models tiny_cnn --metrics input-invariance" in (out / "README.md").read_text()
    for name in paths:
        for k in METRICS:
            assert res["models"][name]["metrics"][k] == before["models"][name]["metrics"][k]
    assert "input-invariance" not in res["models"]["tiny_mlp"]["metrics"]
    # the new column is the metric called directly on the engine of shifted inputs
    x, y, _ = xa.sample(8, 0)
    eng = Engine(str(paths["tiny_cnn"]), device="cpu", threads=1, use_disk_cache=False)
    shifted = Engine(str(paths["tiny_cnn"]), preprocess=eng.preprocess, input_shift=xa.SHIFT,
                     device="cpu", threads=1, use_disk_cache=False)
    for m in METHODS:
        maps = M.compute(eng, x, [m])[m].maps
        metric = base.get("input-invariance").from_options(
            {"explain_shifted": lambda a, t, m=m: M.compute(shifted, a, [m], targets=t)[m].maps})
        want = float(np.nanmean(metric(eng.logits, x, maps, y)["per_image"]))
        assert res["models"]["tiny_cnn"]["metrics"]["input-invariance"][m]["value"] == pytest.approx(want)
    inv = res["models"]["tiny_cnn"]["metrics"]["input-invariance"]
    assert inv["vanilla"]["value"] < 1e-4 < inv["gradient_x_input"]["value"]


def test_add_scores_some_methods_with_options(run, tmp_path):
    """``add --methods`` scores only the given methods (the others keep their scores, or are
    listed as not scored when they have none; other options than the kept scores' are refused),
    ``--set`` reaches the metric, and max- and average-sensitivity equal the metrics called
    directly with the same options."""
    import shutil

    src, paths, _, _ = run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    xa.main(["add", "--metrics", "max-sensitivity,avg-sensitivity", "--models", "tiny_mlp", "--methods",
             "vanilla", "--set", "sensitivity_samples=3", "--set", "sensitivity_radius=0.05", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    part = res["models"]["tiny_mlp"]
    assert set(part["metrics"]["max-sensitivity"]) == {"vanilla"}
    assert part["unscored"] == {"max-sensitivity": ["gradient_x_input"], "avg-sensitivity": ["gradient_x_input"]}
    assert res["setup"]["added"][-1] == {"models": "tiny_mlp", "metrics": "max-sensitivity,avg-sensitivity",
                                         "methods": "vanilla",
                                         "options": {"sensitivity_samples": 3, "sensitivity_radius": 0.05}}
    readme = (out / "README.md").read_text()
    assert ("add --models tiny_mlp --metrics max-sensitivity,avg-sensitivity --methods vanilla "
            "--set sensitivity_samples=3 --set sensitivity_radius=0.05") in readme
    assert "`max-sensitivity`: not scored for gradient_x_input (on tiny_mlp)" in readme
    assert table(readme, "tiny_mlp")["gradient_x_input"]["max-sensitivity"] == "-"
    x, y, _ = xa.sample(8, 0)
    eng = Engine(str(paths["tiny_mlp"]), device="cpu", threads=1, use_disk_cache=False)
    maps = M.compute(eng, x, ["vanilla"])["vanilla"].maps
    for k in ("max-sensitivity", "avg-sensitivity"):
        metric = base.get(k).from_options({"explain_class": lambda a, t: M.compute(eng, a, ["vanilla"], targets=t)
                                           ["vanilla"].maps, "sensitivity_samples": 3, "sensitivity_radius": 0.05})
        want = float(np.nanmean(metric(eng.logits, x, maps, y)["per_image"]))
        assert part["metrics"][k]["vanilla"]["value"] == pytest.approx(want)
    scored = part["metrics"]
    assert scored["max-sensitivity"]["vanilla"]["value"] > scored["avg-sensitivity"]["vanilla"]["value"]
    # all methods again: nothing is left unscored
    xa.main(["add", "--metrics", "max-sensitivity", "--models", "tiny_mlp", "--set", "sensitivity_samples=2",
             "--out", str(out)])
    part = json.loads((out / "results.json").read_text())["models"]["tiny_mlp"]
    assert set(part["metrics"]["max-sensitivity"]) == set(METHODS)
    assert part["unscored"] == {"avg-sensitivity": ["gradient_x_input"]}
    # one method again with the same options: the other keeps its score
    kept = part["metrics"]["max-sensitivity"]["gradient_x_input"]
    xa.main(["add", "--metrics", "max-sensitivity", "--models", "tiny_mlp", "--methods", "vanilla",
             "--set", "sensitivity_samples=2", "--out", str(out)])
    part = json.loads((out / "results.json").read_text())["models"]["tiny_mlp"]
    assert part["metrics"]["max-sensitivity"]["gradient_x_input"] == kept
    assert part["unscored"] == {"avg-sensitivity": ["gradient_x_input"]}
    with pytest.raises(SystemExit, match="sensitivity_samples"):
        xa.main(["add", "--metrics", "max-sensitivity", "--models", "tiny_mlp", "--methods", "vanilla",
                 "--set", "sensitivity_samples=4", "--out", str(out)])


def test_memo_calls_once_per_distinct_input():
    calls = []
    memo = xa.Memo(lambda a, t: calls.append(1) or a[:, 0] * 2)
    a = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    t = np.array([0, 1])
    first = memo(a, t)
    assert np.array_equal(memo(a.copy(), t), first) and len(calls) == 1
    memo(a, np.array([1, 1]))
    memo(a + 1, t)
    assert len(calls) == 3
