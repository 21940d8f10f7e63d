"""``onnxsal evaluate`` gives the model-randomisation metrics (smooth and efficient MPRT) what
they need: the trained model and ``explain_model``, an engine for the randomised copy with the
run's preprocessing. Its scores equal the metrics called directly with
:func:`onnxsal.metrics.randomisation_mprt.model_explainer`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxsal import methods
from onnxsal.data import load_dataset
from onnxsal.engine import Engine
from onnxsal.evaluate import run_evaluate
from onnxsal.metrics import base as metrics
from onnxsal.metrics.randomisation_mprt import model_explainer

DATA = Path(__file__).parent / "data"
MODEL, SAMPLE = DATA / "digits_cnn.onnx", DATA / "digits_sample.npz"
N = 6


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))


def test_mprt_scores_equal_the_metrics_called_directly(tmp_path):
    run_evaluate(str(MODEL), str(SAMPLE), methods=["vanilla"], metrics=["smooth-mprt", "efficient-mprt"],
                 out=tmp_path / "ev", limit=N, device="cpu", threads=1, bootstrap=50, progress=False)
    s = json.loads((tmp_path / "ev" / "scores.json").read_text())
    engine = Engine(str(MODEL), device="cpu", threads=1, use_disk_cache=False)
    ds = load_dataset(str(SAMPLE), shape=engine.input_shape, limit=N)
    maps = methods.compute(engine, ds.images, ["vanilla"])["vanilla"].maps
    explain = model_explainer("vanilla", device="cpu", threads=1, use_disk_cache=False)
    for name in ("smooth-mprt", "efficient-mprt"):
        m = metrics.get(name).from_options({"model": onnx.load(str(MODEL)), "explain_model": explain})
        want = m.per_image_scores(m(engine.logits, ds.images, maps, ds.labels))[""]
        have = [p["score"] for p in s["scores"][name]["methods"]["vanilla"]["per_image"]]
        assert np.isfinite(want).all()
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_per_image_draws_do_not_depend_on_the_shard_size(tmp_path):
    """random-logit, max-sensitivity and smooth-mprt draw per image from (seed, index in the
    data set): shards of 2 images give the scores of one shard of 6."""
    names = ["random-logit", "max-sensitivity", "smooth-mprt"]
    got = []
    for shard in (2, 6):
        run_evaluate(str(MODEL), str(SAMPLE), methods=["vanilla"], metrics=names, out=tmp_path / f"s{shard}",
                     limit=N, shard_size=shard, device="cpu", threads=1, bootstrap=0, progress=False)
        s = json.loads((tmp_path / f"s{shard}" / "scores.json").read_text())
        got.append({n: [p["score"] for p in s["scores"][n]["methods"]["vanilla"]["per_image"]] for n in names})
    for n in names:
        assert np.isfinite(got[0][n]).all(), n
        np.testing.assert_allclose(got[0][n], got[1][n], rtol=1e-6, atol=1e-7, err_msg=n)
