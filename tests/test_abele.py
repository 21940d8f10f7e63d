"""ABELE (-m abele) on the bundled digits model and its bundled adversarial autoencoder:
every exemplar keeps the model's prediction and every counter-exemplar changes it, checked
here with sessions of the ONNX files of our own (not onnxsal's engine or loader); the rules
hold where they say; the map is the banded median difference; seeded runs repeat exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from onnxsal import methods
from onnxsal.cli import cli
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.methods.abele import banded_difference, draw_in_box, knee_index, saliency

DATA = Path(__file__).parent / "data"
AAE = DATA / "aae_digits"
MODEL = DATA / "digits_cnn.onnx"
SAMPLE = DATA / "digits_sample.npz"
FAST = {"samples": 300, "exemplars": 6, "counter_exemplars": 4}
IMAGES = [0, 45, 90, 135]  # digits 0, 2, 4, 6 of the held-out sample


def _sess(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def run():
    eng = Engine(MODEL, device="cpu", threads=1)
    x = np.load(SAMPLE)["x"][IMAGES].astype(np.float32) / 255
    maps = methods.get("abele")(eng, x, autoencoder=str(AAE), **FAST)
    return eng, x, maps


def _label(model, x):
    return _sess(model).run(None, {"input": np.ascontiguousarray(x, np.float32)})[0].argmax(axis=1)


def _holds(premises, z):
    z = np.atleast_2d(z)
    ok = np.ones(len(z), bool)
    for p in premises:
        v = z[:, p["feature"]]
        ok &= (v > p["threshold"]) if p["op"] == ">" else (v <= p["threshold"])
    return ok


def test_exemplars_keep_and_counter_exemplars_change_the_prediction(run):
    _, x, maps = run
    pred = _label(MODEL, x)
    dec = _sess(AAE / "decoder.onnx")
    n_ex = n_cex = 0
    for i, e in enumerate(maps.info["explanations"]):
        assert e["target"] == pred[i] == maps.targets[i]
        ex, cex = maps.info["exemplars"][i], maps.info["counter_exemplars"][i]
        n_ex += len(ex)
        n_cex += len(cex)
        if len(ex):
            assert (_label(MODEL, ex) == pred[i]).all()
            # they are the decoded latents the explanation lists, which satisfy the factual rule
            lat = np.array(e["exemplars"]["latent"], np.float32)
            np.testing.assert_allclose(np.clip(dec.run(None, {"latent": lat})[0], 0, 1), ex, atol=1e-4)
            assert _holds(e["rule"]["premises"], lat).all()
        if len(cex):
            assert (_label(MODEL, cex) != pred[i]).all()
            assert (np.array(e["counter_exemplars"]["model_labels"]) == _label(MODEL, cex)).all()
            lat = np.array(e["counter_exemplars"]["latent"], np.float32)
            np.testing.assert_allclose(np.clip(dec.run(None, {"latent": lat})[0], 0, 1), cex, atol=1e-4)
            for z, r in zip(lat, e["counter_exemplars"]["rule"], strict=True):
                cf = e["counterfactuals"][r]
                assert _holds(cf["premises"], z).all() and cf["class"] != pred[i]
                assert not _holds(e["rule"]["premises"], z).any()
        # every counterfactual said to change the prediction does: its decoded minimal change
        for cf in e["counterfactuals"]:
            z = np.array([cf["minimal_change"]], np.float32)
            assert _holds(cf["premises"], z).all()
            got = _label(MODEL, np.clip(dec.run(None, {"latent": z})[0], 0, 1))[0]
            assert cf["model_label"] == got and cf["changes_prediction"] == (got != pred[i])
            assert len(cf["delta"]) >= 1
    assert n_ex >= 2 * len(IMAGES) and n_cex >= 2 * len(IMAGES)  # the checks above ran


def test_rule_holds_for_the_encoded_image_and_fidelity(run):
    _, x, maps = run
    z0 = _sess(AAE / "encoder.onnx").run(None, {"image": x})[0]
    for i, e in enumerate(maps.info["explanations"]):
        assert _holds(e["rule"]["premises"], z0[i]).all() and e["rule"]["holds_for_image"]
        np.testing.assert_allclose(e["latent"], z0[i], atol=1e-5)
        assert 0.5 <= e["fidelity"] <= 1.0
        nb = e["neighbourhood"]
        assert nb["size"] == nb["same_label"] + nb["other_label"] == sum(nb["classes"].values())
        assert nb["same_label"] >= 0.25 * nb["size"] - 1 and nb["other_label"] >= 0.25 * nb["size"] - 1
        assert e["evaluations"] > nb["size"] and e["engine_calls"] < 40
        json.dumps(e)  # JSON-ready
        # the rule's class is the tree's class of z0: the explained label whenever the decoded
        # z0 keeps it (then every copy of z0 in the neighbourhood carries that label)
        assert e["rule"]["text"].endswith(f"-> {e['rule']['class']} ({e['rule']['class']})")
        if e["reconstruction"]["model_label"] == e["target"]:
            assert e["rule"]["class"] == e["target"]


def test_map_is_the_banded_median_difference(run):
    _, x, maps = run
    assert maps.maps.shape == (len(IMAGES), 20, 20) and maps.signed
    for i in range(len(IMAGES)):
        ex = maps.info["exemplars"][i]
        np.testing.assert_allclose(maps.maps[i], saliency(x[i], ex), atol=1e-6)
        assert np.abs(maps.maps[i]).max() <= 1 and (maps.maps[i] != 0).any()


def test_banded_difference_by_hand():
    # levels (x - e scaled by max |x - e|, 127.5 at no difference): 128 x8, 140 x4, 115 x2,
    # 191 x1, 255 x1; by frequency 128, 140, 115, 191, 255; log counts 2.08, 1.39, 0.69, 0, 0:
    # the knee is the 4th point (191), so the band is 127.5 +- 63.5 and only 255 stays
    levels = np.array([128] * 8 + [140] * 4 + [115] * 2 + [191, 255], np.float64)
    d = ((levels - 127.5) / 127.5).reshape(1, 4, 4)
    d[0].flat[:8] = 0
    e = np.full((1, 4, 4), 0.25)
    got = banded_difference(e + d, e)
    want = np.full((4, 4), 127.5)
    want.flat[15] = 255
    np.testing.assert_array_equal(got, want)
    assert knee_index(np.log([8, 4, 2, 1, 1])) == 3
    # the map: the median over exemplars, centred and scaled to [-1, 1]
    m = saliency(e + d, np.stack([e, e, e + d]))
    assert m.flat[15] == 1.0 and (m.flat[:15] == 0).all()


def test_prior_draws_in_a_box_stay_in_it():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-np.inf, 0.5, -2.0]), np.array([np.inf, 0.6, -1.9])
    z = draw_in_box((lo, hi), 2000, rng)
    assert ((z > lo) & (z <= hi)).all()
    assert abs(z[:, 0].mean()) < 0.1 and abs(z[:, 0].std() - 1) < 0.1  # unconstrained: the prior


def test_seeded_and_deterministic(run):
    eng, x, maps = run
    again = methods.get("abele")(eng, x[:2], autoencoder=str(AAE), **FAST)
    np.testing.assert_array_equal(again.maps, maps.maps[:2])
    def timeless(es):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in es]

    assert timeless(again.info["explanations"]) == timeless(maps.info["explanations"][:2])
    other = methods.get("abele")(eng, x[:1], autoencoder=str(AAE), seed=1, **FAST)
    assert not np.array_equal(other.maps[0], maps.maps[0])


def test_option_errors_are_one_line(run, tmp_path):
    eng, x, _ = run
    with pytest.raises(OptionError, match="needs an adversarial autoencoder"):
        methods.get("abele")(eng, x[:1])
    with pytest.raises(OptionError, match="samples=3"):
        methods.get("abele")(eng, x[:1], autoencoder=str(AAE), samples=3)
    with pytest.raises(OptionError, match="has no option 'sample'"):
        methods.get("abele")(eng, x[:1], autoencoder=str(AAE), sample=3)
    out = tmp_path / "o"
    for args, msg in ((["-m", "abele"], "needs an adversarial autoencoder"),
                      (["-m", "vanilla", "--autoencoder", str(AAE)], "only used by ABELE"),
                      (["-m", "abele", "--autoencoder", str(tmp_path / "none")], "not a folder")):
        res = CliRunner().invoke(cli, ["explain", str(MODEL), str(SAMPLE), "--limit", "1", "--out",
                                       str(out), "--device", "cpu", *args])
        assert res.exit_code != 0 and msg in str(res.exception), (args, res.output, res.exception)
        assert "\n" not in str(res.exception)


def test_cli_explain_abele(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["explain", str(MODEL), str(SAMPLE), "--limit", "1", "-m", "abele",
                                   "--autoencoder", str(AAE), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["methods"] == ["abele"]
    maps = np.load(out / "maps.npz")
    key = [k for k in maps.files if k.endswith("/abele")]
    assert len(key) == 1 and maps[key[0]].shape == (20, 20)


def test_explanation_hooks(run, monkeypatch):
    import dataclasses

    import onnxsal.overlays as overlays

    @dataclasses.dataclass
    class Picture:  # the shape of the explanation figures' picture (title, image, outline)
        title: str
        image: np.ndarray
        outline: np.ndarray | None = None

    if not hasattr(overlays, "Picture"):
        monkeypatch.setattr(overlays, "Picture", Picture, raising=False)
    eng, x, maps = run
    m = methods.get("abele")
    assert m.explanation(maps, 1) is maps.info["explanations"][1]
    arrays = m.explanation_arrays(maps, 1)
    assert arrays["exemplars"].shape[1:] == (1, 20, 20) and arrays["latent"].shape == (4,)
    pics = m.explanation_pictures(maps, 1, x[1], eng.labels)
    n_ex = min(3, len(maps.info["exemplars"][1])) + min(3, len(maps.info["counter_exemplars"][1]))
    assert len(pics) == 3 + n_ex and pics[0].title.startswith("abele: z")
    assert all(p.image.shape == (1, 20, 20) for p in pics)
    assert "counter-exemplar, model -> " in pics[-1].title
