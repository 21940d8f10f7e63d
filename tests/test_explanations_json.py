"""explanations.json, the explanation arrays in maps.npz and the explanation figures of
``onnxsal explain`` for the rule methods (anchor, lore), on the bundled digits model; a run
of map-only methods writes none of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxsal import methods
from onnxsal.cli import cli
from onnxsal.engine import Engine

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expl")
    with np.load(DATA / "digits_sample.npz", allow_pickle=False) as z:
        np.savez(tmp / "two.npz", x=z["x"][[3, 140]], y=z["y"][[3, 140]])
    out = tmp / "out"
    res = CliRunner().invoke(cli, ["explain", str(DATA / "digits_cnn.onnx"), str(tmp / "two.npz"), "-m",
                                   "vanilla,anchor,lore", "--set", "lore.segmentation=slic", "--set", "lore.fill=0",
                                   "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with np.load(out / "maps.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return out, json.loads((out / "explanations.json").read_text()), arrays, tmp / "two.npz"


def test_structure(run):
    out, doc, arrays, _ = run
    pred = json.loads((out / "predictions.json").read_text())
    assert doc["methods"] == ["anchor", "lore"] and doc["complete"] is True
    assert [e["image"] for e in doc["images"]] == [p["image"] for p in pred["images"]]
    for entry, p in zip(doc["images"], pred["images"]):
        assert (out / entry["figure"]).is_file() and entry["figure"].startswith("explanations/")
        a, lo = entry["methods"]["anchor"], entry["methods"]["lore"]
        assert a["target"] == lo["target"] == p["target"]
        # anchor: the rule as text and data, precision within its bounds, coverage
        assert isinstance(a["rule"]["text"], str) and "->" in a["rule"]["text"]
        assert [q["superpixel"] for q in a["rule"]["premises"]] == a["anchor"]
        lb, ub = a["precision_bounds"]
        assert lb <= a["precision"] <= ub and 0 <= a["coverage"] <= 1
        assert isinstance(a["met_threshold"], bool) and a["evaluations"] >= 100
        # lore: factual rule, fidelity, counterfactuals with their validity
        assert lo["rule"]["text"].endswith(f"-> {p['target']} ({p['target']})")
        assert 0 <= lo["fidelity"] <= 1 and 0 <= lo["cv_fidelity"] <= 1 and isinstance(lo["hit"], bool)
        assert lo["counterfactuals"], "slic superpixels with black fill give counterfactuals on digits"
        for cf in lo["counterfactuals"]:
            assert set(cf) >= {"rule", "premises", "class", "changes", "n_changes", "predicted", "valid"}
            assert isinstance(cf["valid"], bool) and cf["valid"] == (cf["predicted"] != lo["target"])
            assert cf["rule"] == " AND ".join(f"s{c['superpixel']} absent" for c in cf["changes"]) + \
                f" -> {cf['class']} ({cf['class']})"
        assert lo["valid_counterfactuals"] == sum(cf["valid"] for cf in lo["counterfactuals"])


def test_arrays_match_the_json_and_the_maps(run):
    out, doc, arrays, _ = run
    stems = [Path(e["figure"]).stem for e in doc["images"]]
    for entry, stem in zip(doc["images"], stems):
        a, lo = entry["methods"]["anchor"], entry["methods"]["lore"]
        seg = arrays[f"{stem}/anchor:segments"]
        assert seg.max() + 1 == a["superpixels"]
        np.testing.assert_array_equal(arrays[f"{stem}/anchor"], np.isin(seg, a["anchor"]).astype(np.float32))
        assert arrays[f"{stem}/anchor:examples_positive"].shape[1] == a["superpixels"]
        seg = arrays[f"{stem}/lore:segments"]
        kept = [q["superpixel"] for q in lo["rule"]["premises"] if q["kept"]]
        np.testing.assert_array_equal(arrays[f"{stem}/lore"], np.isin(seg, kept).astype(np.float32))
        cfz = arrays[f"{stem}/lore:counterfactuals"]
        assert cfz.shape == (len(lo["counterfactuals"]), lo["superpixels"])
        for row, cf in zip(cfz, lo["counterfactuals"]):
            assert np.flatnonzero(~row).tolist() == [c["superpixel"] for c in cf["changes"]]
        z, y = arrays[f"{stem}/lore:neighbourhood"], arrays[f"{stem}/lore:neighbourhood_classes"]
        assert len(z) == len(y) == lo["neighbourhood"] and (y == lo["target"]).sum() == lo["same_outcome"]


def test_counterfactual_validity_from_the_saved_arrays(run):
    """An independent check from the files alone: render each counterfactual and run the model."""
    out, doc, arrays, data = run
    eng = Engine(DATA / "digits_cnn.onnx", device="cpu", threads=1, use_disk_cache=False)
    with np.load(data) as z:
        x = z["x"].astype(np.float32) / 255.0
    for i, entry in enumerate(doc["images"]):
        stem = Path(entry["figure"]).stem
        seg, cfz = arrays[f"{stem}/lore:segments"], arrays[f"{stem}/lore:counterfactuals"]
        imgs = x[i][None] * cfz[:, seg][:, None]  # fill 0
        pred = eng.logits(imgs).argmax(1)
        cfs = entry["methods"]["lore"]["counterfactuals"]
        assert pred.tolist() == [cf["predicted"] for cf in cfs]


def test_map_only_methods_write_no_explanations(tmp_path):
    res = CliRunner().invoke(cli, ["explain", str(DATA / "digits_cnn.onnx"), str(DATA / "digits_sample.npz"),
                                   "--limit", "1", "-m", "vanilla", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "explanations.json").exists() and not (tmp_path / "explanations").exists()
    with np.load(tmp_path / "maps.npz") as z:
        assert z.files == ["x_0_/vanilla"]
    assert not methods.get("vanilla").explains() and methods.get("lore").explains()
    assert methods.get("anchor").explains()


def test_a_failing_hook_costs_only_its_explanation(tmp_path, monkeypatch):
    def broken(self, maps, i, image, labels=None):
        raise RuntimeError("no pictures today")

    monkeypatch.setattr(type(methods.get("anchor")), "explanation_pictures", broken)
    res = CliRunner().invoke(cli, ["explain", str(DATA / "digits_cnn.onnx"), str(DATA / "digits_sample.npz"),
                                   "--limit", "2", "-m", "anchor,vanilla", "--out", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pred = json.loads((tmp_path / "predictions.json").read_text())
    errors = [f["error"] for f in pred["failures"]]
    assert len(errors) == 2 and all("explanation of anchor not written (RuntimeError: no pictures today)" in e
                                    for e in errors)
    doc = json.loads((tmp_path / "explanations.json").read_text())
    assert [e["figure"] for e in doc["images"]] == [None, None]
    assert all("precision" in e["methods"]["anchor"] for e in doc["images"])
    with np.load(tmp_path / "maps.npz") as z:
        assert {"x_0_/anchor", "x_0_/vanilla", "x_1_/anchor", "x_1_/vanilla"} <= set(z.files)
