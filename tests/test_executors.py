"""Executors without Ray: the local executor is today's loop and never imports Ray; a shard
group is a plain picklable value whose computation matches the driver's; ``--executor ray``
without Ray installed is one error line with the install command."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxsal.benchmark import EngineSpec, MetricSpec, ShardGroup, compute_group, run_benchmark
from onnxsal.data import load_dataset
from onnxsal.errors import OptionError
from onnxsal.executors import LocalExecutor, RayExecutor, make_executor

from test_hostile import save, tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save(tiny(seed=3, c=1, hw=8, classes=10), tmp_path_factory.mktemp("ex") / "m.onnx")


def _env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", ONNXSAL_CACHE=str(tmp_path / "cache"))


def test_local_executor_never_imports_ray(tmp_path, model):
    code = ("import sys, onnxsal.cli\n"
            "sys.argv = ['onnxsal', 'benchmark', sys.argv[1], '--data', 'digits', '--limit', '20',"
            " '--out', sys.argv[2], '-m', 'original,positive', '--quiet', '--threads', '1']\n"
            "try:\n    onnxsal.cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('RAY' if 'ray' in sys.modules else 'NO RAY')\n")
    p = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "o")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "NO RAY"
    d = json.loads((tmp_path / "o" / "results.json").read_text())
    assert d["timing"]["executor"] == {"name": "local"}


def test_ray_missing_is_one_error_line_with_the_install_command(tmp_path, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what a missing package looks like to import
    with pytest.raises(OptionError, match=r"pip install 'onnxsal\[ray\]'"):
        make_executor("ray")
    with pytest.raises(OptionError, match="Ray"):
        run_benchmark([model], "digits", "original", limit=8, out_dir=tmp_path / "o",
                      progress=False, executor="ray")
    assert not (tmp_path / "o").exists()  # refused before any work
    code = ("import sys, onnxsal.cli\nsys.modules['ray'] = None\n"
            "sys.argv = ['onnxsal', 'benchmark', sys.argv[1], '--data', 'digits', '--out', "
            "sys.argv[2], '--executor', 'ray', '--workers', '2']\nonnxsal.cli.main()\n")
    p = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "c")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1, p.stderr
    assert "pip install 'onnxsal[ray]'" in p.stderr and p.stdout == ""


def test_executor_options_are_checked():
    with pytest.raises(OptionError, match="--workers: only for --executor ray"):
        make_executor("local", workers=2)
    with pytest.raises(OptionError, match="not one of local, ray"):
        make_executor("dask")
    assert isinstance(make_executor("local", workers=None), LocalExecutor)
    pytest.importorskip("ray")  # only the checks below need Ray (tests/test_ray.py requires it)
    with pytest.raises(OptionError, match="at least 1"):
        RayExecutor(workers=0)
    with pytest.raises(OptionError, match="positive"):
        RayExecutor(cpus_per_worker=0)


def test_a_shard_group_is_a_plain_value_that_gives_the_drivers_shards(tmp_path, model):
    """compute_group on a group that went through pickle (what reaches a worker), with an
    engine built from the model's bytes, gives the shard files the local run wrote."""
    out = tmp_path / "o"
    methods = ["original", "positive", "smoothgrad"]
    run_benchmark([model], "digits", methods, limit=24, out_dir=out, progress=False,
                  shard_size=16, threads=1)
    d = json.loads((out / "results.json").read_text())
    ds = load_dataset("digits", limit=24)
    key = (out / d["models"][0]["shards"]).name.rsplit("-", 1)[1]
    from onnxsal.engine import Engine

    spec = EngineSpec(key=key, model_hash=d["models"][0]["hash"], threads=1)
    group = ShardGroup(model_index=0, model_name="m", engine=spec, start=16, stop=24,
                       methods=tuple(methods), images=ds.images[16:24], labels=ds.labels[16:24],
                       seed=0, metric=MetricSpec())
    group = pickle.loads(pickle.dumps(group))
    eng = spec.build(Path(model).read_bytes())
    assert isinstance(eng, Engine) and eng.path is None
    parts = compute_group(group, eng)
    assert list(parts) == methods
    for meth, part in parts.items():
        with np.load(out / d["models"][0]["shards"] / f"{meth}-0000016-0000024.npz") as z:
            assert sorted(z.files) == sorted(part)
            for k in z.files:
                np.testing.assert_array_equal(z[k], part[k], err_msg=f"{meth} {k}")
    # a worker given other bytes than the driver planned with refuses them
    other = save(tiny(seed=4, c=1, hw=8, classes=10), tmp_path / "other.onnx")
    with pytest.raises(Exception, match="differs from the driver's"):
        spec.build(Path(other).read_bytes())
