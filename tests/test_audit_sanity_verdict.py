"""The audit's sanity verdict reads both rules of the sanity check: the end-point rule and the
per-step (top-layer) rule, so a method that passes at the end but ignores the top layers
(guided backprop) is named in the summary."""

from __future__ import annotations

from onnxsal.audit.summary import sanity_verdict


def _report(top: dict[str, bool | None]) -> dict:
    return {"verdicts": {m: {"passes": True} for m in top},
            "step_verdicts": {m: {"passes": p} for m, p in top.items()}}


def test_a_top_layer_failure_is_named_and_bad():
    v = sanity_verdict(_report({"vanilla": True, "guided_backprop": False}))
    assert v["level"] == "bad"
    assert "the maps of guided_backprop do not change significantly when only the top layer" in v["text"]
    assert "vanilla" in v["text"] and "vanilla do not" not in v["text"]


def test_all_passing_is_good_and_old_reports_still_read():
    assert sanity_verdict(_report({"vanilla": True, "gradcam": True}))["level"] == "good"
    assert sanity_verdict({"verdicts": {"vanilla": {"passes": True}}})["level"] == "good"
