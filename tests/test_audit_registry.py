"""The audit iterates the metric registry: a metric a plugin registers with category
"robustness" appears in the report's robustness section (with the value it computes), and
without one the section says that none is registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxsal import plugins
from onnxsal.audit import run_audit
from onnxsal.metrics import base as metrics
from onnxsal.metrics.base import Metric

DATA = Path(__file__).parent / "data"
SMALL = dict(methods=["vanilla"], per_class=1, eval_images=8, sanity_images=2, max_steps=1,
             shortcut_images=0)


@pytest.fixture
def robust_metric():
    """A toy robustness metric, registered for this test only."""
    metrics.names()
    saved = dict(metrics._REGISTRY), set(plugins._done)

    class BrightnessStability(Metric):
        """1 when the prediction survives adding 0.3 to every pixel (clipped), else 0."""

        name = "toy-brightness-stability"
        direction = "higher"
        category = "robustness"

        def evaluate_batch(self, predict_logits, images, maps, labels):
            a = np.asarray(predict_logits(images)).argmax(1)
            b = np.asarray(predict_logits(np.clip(images + 0.3, 0, 1))).argmax(1)
            return {"value": (a == b).astype(np.float64)}

    yield BrightnessStability
    metrics._REGISTRY.clear()
    metrics._REGISTRY.update(saved[0])
    plugins._done.clear()
    plugins._done.update(saved[1])


def test_a_registered_robustness_metric_is_reported(robust_metric, tmp_path):
    rep = run_audit(DATA / "digits_cnn.onnx", str(DATA / "digits_sample.npz"), tmp_path / "a",
                    metrics=["toy-brightness-stability", "sparseness"], **SMALL)
    assert rep["benchmark"]["category"]["toy-brightness-stability"] == "robustness"
    value = rep["benchmark"]["rows"][0]["metrics"]["toy-brightness-stability"]["value"]
    # the same on the same (class-stratified) images, straight from onnxruntime
    z = np.load(DATA / "digits_sample.npz")
    x = (z["x"].astype(np.float32) / 255)
    from onnxsal.audit.sections import stratified

    x = x[stratified(z["y"], 8)]
    sess = ort.InferenceSession(str(DATA / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    run = lambda v: sess.run(None, {sess.get_inputs()[0].name: v})[0].argmax(1)  # noqa: E731
    assert value == pytest.approx(np.mean(run(x) == run(np.clip(x + 0.3, 0, 1))))
    html = (tmp_path / "a" / "report.html").read_text()
    robust = html[html.index('id="robustness"'):html.index('id="localisation"')]
    assert "toy-brightness-stability" in robust and "No robustness metric" not in robust
    faith = html[html.index('id="faithfulness"'):html.index('id="robustness"')]
    assert "toy-brightness-stability" not in faith and "sparseness" in faith
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["settings"]["metrics"] == [
        "toy-brightness-stability", "sparseness"]


def test_without_one_the_section_says_so(tmp_path):
    run_audit(DATA / "digits_cnn.onnx", str(DATA / "digits_sample.npz"), tmp_path / "b",
              metrics=["sparseness"], **SMALL)
    html = (tmp_path / "b" / "report.html").read_text()
    assert "No robustness metric is registered" in html
