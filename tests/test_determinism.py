"""Determinism (issue 8): the same command with the same seed gives identical result files
(timings aside) for ``benchmark``, ``sanity`` and ``explain``.

Each command runs twice as a real process, with different ``PYTHONHASHSEED`` values (so that
set and dict ordering of strings cannot leak into results), including seeded methods
(SmoothGrad, RISE, LIME) and RISE metrics; a different seed must change what it seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_hostile import save, tiny


def _cli(*args, hashseed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "onnxsal.cli", *map(str, args)], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _same_npz(a: Path, b: Path) -> None:
    za, zb = _npz(a), _npz(b)
    assert sorted(za) == sorted(zb), (a, b)
    for k in za:
        np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{a.name}: {k}")


def _json_without(path: Path, *keys: str) -> dict:
    d = json.loads(path.read_text())
    for k in keys:
        d.pop(k, None)
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    model = save(tiny(seed=5), root / "m.onnx")
    rng = np.random.default_rng(11)
    np.savez(root / "d.npz", x=(rng.random((10, 8, 8, 3)) * 255).astype(np.uint8), y=np.arange(10) % 4)
    return root, model, root / "d.npz"


def test_benchmark_is_deterministic(setup, tmp_path):
    root, model, data = setup
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, hs in zip(outs, ("1", "2")):
        _cli("benchmark", model, "--data", data, "-m", "original,active,smoothgrad", "--out", out,
             "--seed", "3", "--shard-size", "4", "--rise", "--quiet", "--device", "cpu",
             "--threads", "1", hashseed=hs)
    a, b = outs
    assert _json_without(a / "results.json", "timing") == _json_without(b / "results.json", "timing")
    for f in ("results.md", "curves.csv", "curves.png"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    shards_a = sorted(p.relative_to(a) for p in (a / "shards").rglob("*.npz"))
    assert shards_a == sorted(p.relative_to(b) for p in (b / "shards").rglob("*.npz"))
    assert len(shards_a) == 9  # 3 slices x 3 methods
    for rel in shards_a:
        _same_npz(a / rel, b / rel)


def test_sanity_is_deterministic_and_seeded(setup, tmp_path):
    root, model, data = setup
    runs = {}
    for name, seed, hs in (("a", 0, "1"), ("b", 0, "2"), ("c", 1, "1")):
        out = tmp_path / name
        _cli("sanity", model, "--data", data, "-m", "vanilla,smoothgrad", "--limit", "6",
             "--out", out, "--seed", str(seed), "--quiet", "--device", "cpu", "--threads", "1",
             hashseed=hs)
        runs[name] = out
    a, b, c = runs["a"], runs["b"], runs["c"]
    for f in ("sanity.json", "sanity.md", "cascading.png", "maps_grid.png"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    steps = sorted(p.name for p in (a / "steps").iterdir())
    assert steps == sorted(p.name for p in (b / "steps").iterdir()) and len(steps) == 3
    for s in steps:
        _same_npz(a / "steps" / s, b / "steps" / s)
    # another seed re-initialises the weights differently: the similarities change
    ja, jc = json.loads((a / "sanity.json").read_text()), json.loads((c / "sanity.json").read_text())
    va = [s["methods"]["vanilla"]["spearman_abs"]["mean"] for s in ja["steps"][1:]]
    vc = [s["methods"]["vanilla"]["spearman_abs"]["mean"] for s in jc["steps"][1:]]
    assert va != vc


def test_explain_is_deterministic(setup, tmp_path):
    root, model, data = setup
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, hs in zip(outs, ("1", "2")):
        _cli("explain", model, data, "--limit", "3", "--out", out, "-m",
             "vanilla,active,gradcam,smoothgrad,integrated_gradients,occlusion,rise,lime",
             "--device", "cpu", hashseed=hs)
    a, b = outs
    _same_npz(a / "maps.npz", b / "maps.npz")
    assert len(_npz(a / "maps.npz")) == 3 * 8
    assert _json_without(a / "predictions.json", "seconds") == _json_without(b / "predictions.json", "seconds")
    figures = [p["figure"] for p in json.loads((a / "predictions.json").read_text())["images"]]
    assert len(figures) == 3
    for f in figures:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
