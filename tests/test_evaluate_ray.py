"""``onnxsal evaluate`` on the Ray executor (a local Ray instance started here, 2 CPUs, 2
worker actors, as tests/test_ray.py does): a run stopped on the local executor and finished
on Ray gives the scores of a local run, with the metrics that re-explain (random-logit) built
in the workers from their own engines.

Ray is required (the CI installs the ``ray`` extra): this fails, not skips, without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from onnxsal.evaluate import run_evaluate
from onnxsal.executors import RayExecutor

DATA = Path(__file__).parent / "data"
METHODS = ["vanilla", "smoothgrad"]  # smoothgrad: seeded, in the worker too
METRICS = ["sparseness", "random-logit", "region-perturbation-morf"]


def _run(out, **kw):
    return run_evaluate(str(DATA / "digits_cnn.onnx"), str(DATA / "digits_sample.npz"), METHODS,
                        METRICS, out, limit=16, shard_size=8, device="cpu", threads=1,
                        progress=False, bootstrap=200, **kw)


def _same(a: Path, b: Path) -> None:
    ja, jb = (json.loads((p / "scores.json").read_text()) for p in (a, b))
    for j in (ja, jb):
        j.pop("timing")
        j["model"].pop("provider")
    assert ja == jb
    assert (a / "scores.md").read_text() == (b / "scores.md").read_text()
    sa = sorted(p.relative_to(a) for p in a.glob("shards/**/*.npz"))
    assert sa == sorted(p.relative_to(b) for p in b.glob("shards/**/*.npz")) and len(sa) == 2 * 2 + 3 * 2 * 2


def test_a_run_stopped_locally_and_finished_on_ray_gives_the_local_scores(ray_instance, tmp_path):
    local = _run(tmp_path / "local")
    assert local["complete"]
    out = tmp_path / "mixed"
    assert not _run(out, stop_after=7)["complete"]
    res = _run(out, executor=RayExecutor(workers=2))
    assert res["complete"] and res["timing"]["executor"]["workers"] == 2
    assert res["timing"]["parts_computed_this_run"] == 16 - 7
    _same(tmp_path / "local", out)
    assert ray.is_initialized()  # the test's Ray instance is left running
