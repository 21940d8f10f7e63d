"""The Ray executor on a local Ray instance started here (2 CPUs, 2 worker actors): the same
benchmark gives the same result files as the local executor (timings aside), a worker killed
mid-run loses no finished shard and the run completes, a run stopped on one executor resumes
on the other, and the CLI drives an existing cluster through ``--address``.

Ray is required (the CI installs the ``ray`` extra): these tests fail, not skip, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from onnxsal.benchmark import run_benchmark
from onnxsal.errors import OptionError
from onnxsal.executors import RayExecutor

METHODS = ["original", "positive", "smoothgrad"]  # smoothgrad: seeded, per slice
LIMIT, SHARD = 64, 8  # 8 groups x 3 methods = 24 shards


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A tiny CNN trained briefly on the 8x8 digits, exported to ONNX."""
    import onnx
    import torch

    from onnxsal.data import load_dataset

    from conftest import export_torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = load_dataset("digits", limit=512)
    x, y = torch.tensor(d.images), torch.tensor(d.labels)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    path = tmp_path_factory.mktemp("ray_model") / "cnn.onnx"
    onnx.save(export_torch(net, x[:2]), str(path))
    return path


def _bench(model, out, **kw):
    args = dict(limit=LIMIT, out_dir=out, progress=False, shard_size=SHARD, threads=1)
    args.update(kw)
    return run_benchmark([model], "digits", METHODS, **args)


@pytest.fixture(scope="module")
def local_run(cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    res = _bench(cnn, out)
    assert res["complete"] and res["timing"]["executor"] == {"name": "local"}
    return out


def _same_results(a: Path, b: Path) -> None:
    for f in ("results.md", "curves.csv"):
        assert (a / f).read_text() == (b / f).read_text(), f
    ja, jb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    ja.pop("timing"), jb.pop("timing")
    assert ja == jb
    sa = sorted(p.relative_to(a) for p in a.glob("shards/*/*.npz"))
    assert sa == sorted(p.relative_to(b) for p in b.glob("shards/*/*.npz"))
    assert len(sa) == (LIMIT // SHARD) * len(METHODS)
    for rel in sa:
        with np.load(a / rel) as za, np.load(b / rel) as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{rel}: {k}")


def test_ray_gives_the_local_results_and_loads_each_model_once_per_worker(
        ray_instance, cnn, local_run, tmp_path):
    stats = []

    def on_result(ex, delivered):
        if delivered == LIMIT // SHARD:  # the last group: nothing in flight any more
            stats.extend(ray.get([a.stats.remote() for a in ex.actors]))

    ex = RayExecutor(workers=2, on_result=on_result)
    res = _bench(cnn, tmp_path, executor=ex)
    assert res["complete"]
    assert res["timing"]["shards_computed_this_run"] == 24
    assert res["timing"]["executor"]["workers"] == 2
    _same_results(local_run, tmp_path)
    # two worker processes, each built the engine once for all the groups it computed
    assert len({s["pid"] for s in stats}) == 2 and os.getpid() not in {s["pid"] for s in stats}
    assert [s["loads"] for s in stats] == [1, 1]
    assert ex.replaced == 0 and ray.is_initialized()  # the test's Ray instance is left running


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_worker_loses_no_finished_shard_and_the_run_completes(
        ray_instance, cnn, local_run, tmp_path, how):
    seen: dict = {}

    def kill_first_worker(ex, delivered):
        if delivered == 1:  # the first group is back and written; the others are in flight
            seen["files"] = {p: p.read_bytes() for p in tmp_path.glob("shards/*/*.npz")}
            seen["victim"] = ex.actors[0]
            if how == "ray.kill":
                ray.kill(ex.actors[0])
            else:  # the worker process crashes
                import signal

                os.kill(ray.get(ex.actors[0].pid.remote()), signal.SIGKILL)

    ex = RayExecutor(workers=2, max_in_flight=2, on_result=kill_first_worker)
    res = _bench(cnn, tmp_path, executor=ex)
    assert res["complete"]
    assert len(seen["files"]) == len(METHODS)  # one group was written before the kill
    for p, data in seen["files"].items():  # ... and is untouched
        assert p.read_bytes() == data
    # the dead worker was replaced, its queued groups went to the live workers, and every
    # shard was computed exactly once (nothing finished was lost or recomputed)
    assert ex.replaced == 1 and ex.reassigned >= 1
    assert seen["victim"] not in ex.actors
    assert res["timing"]["shards_computed_this_run"] == 24
    assert res["timing"]["executor"]["replaced_workers"] == 1
    _same_results(local_run, tmp_path)


def test_a_stopped_run_resumes_on_the_other_executor(ray_instance, cnn, local_run, tmp_path):
    a, b = tmp_path / "ray-then-local", tmp_path / "local-then-ray"
    part = _bench(cnn, a, executor=RayExecutor(workers=2), stop_after=5)
    assert not part["complete"] and part["done"] >= 5 and part["done"] % len(METHODS) == 0
    assert not (a / "results.json").exists()
    res = _bench(cnn, a)
    assert res["timing"]["shards_computed_this_run"] == 24 - part["done"]
    _same_results(local_run, a)

    part = _bench(cnn, b, stop_after=4)  # the local executor stops inside a group
    assert part == {"complete": False, "shards": 24, "done": 4}
    res = _bench(cnn, b, executor=RayExecutor(workers=2))
    assert res["timing"]["shards_computed_this_run"] == 20
    _same_results(local_run, b)


def test_cli_on_an_existing_cluster(ray_instance, cnn, local_run, tmp_path):
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, OMP_NUM_THREADS="1", ONNXSAL_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "onnxsal.cli", "benchmark", str(cnn), "--data",
                        "digits", "--limit", str(LIMIT), "--shard-size", str(SHARD), "-m",
                        ",".join(METHODS), "--out", "o", "--threads", "1", "--quiet",
                        "--executor", "ray", "--address", address, "--workers", "2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wrote o/results.json" in p.stdout
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["timing"]["executor"]["address"] == address
    _same_results(local_run, tmp_path / "o")
    # asking for more than the cluster has is one error line, not a hang
    p = subprocess.run([sys.executable, "-m", "onnxsal.cli", "benchmark", str(cnn), "--data",
                        "digits", "--limit", "8", "--out", "o2", "--quiet", "--executor", "ray",
                        "--address", address, "--workers", "3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert "do not fit the Ray cluster's 2 CPUs" in p.stderr


def test_gpu_workers_are_asked_for_and_refused_on_a_cpu_cluster(ray_instance, cnn, tmp_path):
    ex = RayExecutor(workers=1)
    with pytest.raises(OptionError, match="1 GPUs per worker asked for .* has 0 GPUs"):
        _bench(cnn, tmp_path / "a", device="cuda", executor=ex)
    assert ex.gpus == 1 and not (tmp_path / "a").exists() and ray.is_initialized()
    with pytest.raises(OptionError, match=r"2 workers x 1.5 CPUs do not fit .* 2 CPUs"):
        _bench(cnn, tmp_path / "b", executor=RayExecutor(workers=2, cpus_per_worker=1.5))
    ex = RayExecutor(gpus_per_worker=0)
    ex.for_device("cuda")  # an explicit 0 is kept (the workers then see no GPU)
    assert ex.gpus == 0


def test_sanity_check_on_ray_gives_the_local_files_and_resumes_across_executors(
        ray_instance, cnn, tmp_path):
    from onnxsal.sanity_run import run_sanity

    def sanity(out, **kw):
        return run_sanity(cnn, "digits", ["vanilla", "smoothgrad"], out, limit=12, max_steps=2,
                          threads=1, **kw)

    local, remote, resumed = tmp_path / "local", tmp_path / "ray", tmp_path / "resumed"
    sanity(local)
    said = []
    ex = RayExecutor(workers=2)
    sanity(remote, executor=ex, progress=said.append)
    assert ex.delivered == 1 + 3 and len(said) == 1 + 3 + 1  # trained maps, 3 steps, "wrote"
    # the resumed run: step 1 done locally, the others (steps 0 and 3 of 3 layers) on Ray
    sanity(resumed)
    (resumed / "sanity.json").unlink()
    for f in ("steps/step_000.npz", "steps/step_003.npz"):
        (resumed / f).unlink()
    ex2 = RayExecutor(workers=2)
    sanity(resumed, executor=ex2)
    assert ex2.delivered == 1 + 2
    for out in (remote, resumed):
        for f in ("sanity.json", "sanity.md", "cascading.png", "maps_grid.png"):
            assert (out / f).read_bytes() == (local / f).read_bytes(), f
        for f in sorted(local.glob("steps/*.npz")):
            with np.load(f) as za, np.load(out / "steps" / f.name) as zb:
                assert sorted(za.files) == sorted(zb.files)
                for k in za.files:
                    np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{f.name}: {k}")
