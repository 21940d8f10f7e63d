"""The per-step verdict of the cascading randomisation test (onnxsal.sanity_report.STEP_RULE):
by hand on made-up similarities, then on the bundled digits CNN, where the vanilla gradient
changes as soon as the top layer is randomised and guided backprop does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onnxsal.sanity_report import step_drop, step_verdicts
from onnxsal.sanity_run import run_sanity

DATA = Path(__file__).parent / "data"


def test_step_drop_by_hand():
    base = np.ones(8)
    # eight images, every one lower: the exact one-sided signed-rank p is 1 / 2^8
    got = step_drop(base, base - np.linspace(0.1, 0.3, 8), 0.05, 0.05)
    assert got["drop"] == 0.2 and abs(got["p_value"] - 1 / 256) < 1e-12 and got["dropped"]
    small = step_drop(base, base - 0.01 * np.arange(1, 9), 0.05, 0.05)  # significant, too small
    assert small["p_value"] < 0.01 and not small["dropped"]
    mixed = step_drop(base, base + np.array([-0.3, 0.3] * 4), 0.05, 0.05)  # large but no direction
    assert mixed["drop"] == 0 and not mixed["dropped"]
    same = step_drop(base, base, 0.05, 0.05)
    assert same["p_value"] == 1.0 and not same["dropped"]
    nan = step_drop(base, np.full(8, np.nan), 0.05, 0.05)
    assert nan["dropped"] is None
    steps = [(1, "top", base - 0.01), (2, "mid", base - 0.5), (3, "low", base - 0.6)]
    v = step_verdicts(base, steps, 0.05, 0.05, 1)
    assert v["passes"] is False and v["first_drop"] == 2 and "`top`" in v["reason"]
    assert [s["dropped"] for s in v["steps"]] == [False, True, True]
    assert step_verdicts(base, steps[1:], 0.05, 0.05, 2)["passes"] is True


def test_guided_backprop_fails_the_top_layer_verdict(tmp_path):
    x = np.load(DATA / "digits_sample.npz")["x"][:12].astype(np.float32) / 255
    rep = run_sanity(DATA / "digits_cnn.onnx", x, ["vanilla", "guided_backprop"], tmp_path,
                     threads=1, plots=False, max_steps=3)
    sv = rep["step_verdicts"]
    assert sv["vanilla"]["passes"] is True and sv["vanilla"]["first_drop"] == 1
    assert sv["guided_backprop"]["passes"] is False and sv["guided_backprop"]["first_drop"] != 1
    top = sv["guided_backprop"]["steps"][0]
    assert top["step"] == 1 and top["drop"] < 0.02 < sv["vanilla"]["steps"][0]["drop"]
    # the end-point rule passes both: only the per-step verdict tells them apart
    assert rep["verdicts"]["vanilla"]["passes"] and rep["verdicts"]["guided_backprop"]["passes"]
    for m in ("vanilla", "guided_backprop"):  # the drops are those of the step means
        for k, s in enumerate(rep["steps"][1:]):
            d = sv[m]["steps"][k]
            assert abs(d["drop"] - (rep["steps"][0]["methods"][m]["spearman_abs"]["mean"]
                                    - s["methods"][m]["spearman_abs"]["mean"])) < 1e-9
    md = (tmp_path / "sanity.md").read_text()
    assert "## Per-step verdicts" in md and "| guided_backprop | **fail** |" in md
    assert "| vanilla | **pass** | 1 |" in md
    assert json.loads((tmp_path / "sanity.json").read_text())["step_verdicts"] == json.loads(json.dumps(sv))
