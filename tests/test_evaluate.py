"""``onnxsal evaluate`` (docs/evaluate.md) on the bundled digits CNN and images: the structure
of scores.json, its numbers against the metrics called directly through the Python API on
the same maps, the --maps round trip, the bootstrap interval, resuming, and bad --maps files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from onnxsal import methods
from onnxsal.data import load_dataset
from onnxsal.engine import Engine
from onnxsal.evaluate import bootstrap_ci, load_maps, reduce_channels, run_evaluate
from onnxsal.metrics import base as metrics

from test_hostile import one_error_line, run_main

DATA = Path(__file__).parent / "data"
MODEL, SAMPLE = DATA / "digits_cnn.onnx", DATA / "digits_sample.npz"
N, SHARD = 24, 8
METHODS = ["vanilla", "integrated_gradients"]
METRICS = ["sparseness", "region-perturbation-morf", "random-logit", "black-white-deletion",
           "pointing-game", "input-invariance"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def engine():
    return Engine(str(MODEL), device="cpu", threads=1, use_disk_cache=False)


@pytest.fixture(scope="module")
def data(engine):
    return load_dataset(str(SAMPLE), shape=engine.input_shape, limit=N)


def boxes_npz(path: Path, n: int = N) -> Path:
    """A mask per image: a random box of at least 6 x 6 pixels."""
    rng = np.random.default_rng(5)
    m = np.zeros((n, 20, 20), bool)
    for i in range(n):
        y, x = rng.integers(0, 14, 2)
        m[i, y:y + 6 + rng.integers(0, 4), x:x + 6 + rng.integers(0, 4)] = True
    np.savez(path, masks=m)
    return path


def evaluate_cli(out, *extra) -> tuple[int, str, str]:
    return run_main(["evaluate", MODEL, "--data", SAMPLE, "--out", out, "--limit", N,
                     "--shard-size", SHARD, "--threads", 1, "--device", "cpu", "--quiet",
                     "--bootstrap", 200, *extra])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    masks = boxes_npz(out / "masks.npz")
    code, stdout, stderr = evaluate_cli(out / "run", "-m", ",".join(METHODS), "--metrics",
                                        ",".join(METRICS), "--masks", masks)
    assert code == 0, stderr
    return out / "run", masks, stdout, stderr


def test_cli_scores_json_structure(cli_run):
    out, _, stdout, stderr = cli_run
    s = json.loads((out / "scores.json").read_text())
    assert s["tool"] == "onnxsal evaluate" and s["settings"]["methods"] == METHODS
    assert s["model"]["hash"] and s["versions"]["numpy"] and s["data"]["count"] == N
    assert s["skipped"] == [] and "skipped" not in stderr
    cols = ["sparseness", "region-perturbation-morf", "random-logit",
            "black-white-deletion:black", "black-white-deletion:white", "pointing-game",
            "input-invariance"]
    assert list(s["scores"]) == cols
    # input invariance on the model behind a preprocessing that subtracts the shift: the
    # gradient is the same function's gradient (0 up to float rounding); integrated gradients
    # from a black (0) baseline are not invariant (Kindermans et al. 2019)
    inv = {m: e["mean"] for m, e in s["scores"]["input-invariance"]["methods"].items()}
    assert inv["vanilla"] < 1e-4 and inv["integrated_gradients"] > 0.05, inv
    names = [f"x[{i}]" for i in range(N)]
    for col, sc in s["scores"].items():
        assert sc["direction"] == metrics.get(sc["metric"]).direction
        assert list(sc["methods"]) == METHODS
        for e in sc["methods"].values():
            assert [p["image"] for p in e["per_image"]] == names
            v = np.array([np.nan if p["score"] is None else p["score"] for p in e["per_image"]])
            assert e["images"] == N and e["valid_images"] == np.isfinite(v).sum()
            assert e["mean"] == pytest.approx(np.nanmean(v))
            lo, hi = e["ci"]
            assert lo <= e["mean"] <= hi, (col, e["mean"], e["ci"])
    md = (out / "scores.md").read_text()
    assert "| method | sparseness \u2191 | region-perturbation-morf \u2193 |" in md
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == sorted(
        c.replace(":", "_") + ".png" for c in cols)
    assert "| vanilla |" in stdout


def test_cli_numbers_equal_the_metrics_called_directly(cli_run, engine, data):
    """Each metric through the Python API on each shard's images and onnxsal's maps of them
    (per shard, each metric told where its shard starts: the random-logit draw follows the
    image's index in the data set)."""
    out, masks_file, _, _ = cli_run
    s = json.loads((out / "scores.json").read_text())
    masks = np.load(masks_file)["masks"]
    for meth in METHODS:
        got: dict[str, list] = {}
        for a in range(0, N, SHARD):
            x, y = data.images[a:a + SHARD], data.labels[a:a + SHARD]
            maps = methods.compute(engine, x, [meth])[meth].maps

            def explain(imgs, t, meth=meth):
                return methods.compute(engine, imgs, [meth], targets=t)[meth].maps

            opts = {"masks": masks[a:a + SHARD], "explain_class": explain}
            for name in METRICS[:-1]:
                m = metrics.get(name).from_options(opts)
                m.index_offset = a
                for variant, v in m.per_image_scores(m(engine.logits, x, maps, y)).items():
                    got.setdefault(name + (f":{variant}" if variant else ""), []).append(v)
        for col, parts in got.items():
            want = np.concatenate(parts)
            have = [p["score"] for p in s["scores"][col]["methods"][meth]["per_image"]]
            np.testing.assert_allclose(np.array(have, np.float64), want, rtol=1e-9,
                                       err_msg=f"{col} {meth}")


def test_deletion_per_image_mean_is_the_benchmark_auc(engine, data):
    m = metrics.get("black-white-deletion").from_options({})
    x, y = data.images, data.labels
    maps = methods.compute(engine, x, ["vanilla"])["vanilla"].maps
    res = m(engine.logits, x, maps, y)
    for mode, v in m.per_image_scores(res).items():
        assert np.nanmean(v) == pytest.approx(res.auc[mode], abs=1e-12)


def shard_maps(out: Path) -> dict[str, np.ndarray]:
    """The maps a run computed, read back from its maps parts, in image order."""
    files = sorted(out.glob("shards/*/maps/*.npz"))
    got: dict[str, list] = {}
    for f in files:  # <method>-onnxsal-<start>-<stop>.npz
        meth = f.name.split("-onnxsal-")[0]
        got.setdefault(meth, []).append((int(f.stem.split("-")[-2]), np.load(f)["maps"]))
    return {k: np.concatenate([a for _, a in sorted(v, key=lambda t: t[0])])
            for k, v in got.items()}


def test_maps_round_trip_gives_identical_scores(cli_run, tmp_path):
    out, masks, _, _ = cli_run
    own = shard_maps(out)
    assert sorted(own) == sorted(METHODS) and own["vanilla"].shape == (N, 20, 20)
    f = tmp_path / "maps.npz"
    # one as [N, H, W], one as [N, 1, H, W] (the channel axis of a signed method is summed)
    np.savez(f, vanilla=own["vanilla"], integrated_gradients=own["integrated_gradients"][:, None])
    code, _, stderr = evaluate_cli(tmp_path / "run", "--maps", f, "--metrics", ",".join(METRICS),
                                   "--masks", masks)
    assert code == 0, stderr
    a = json.loads((out / "scores.json").read_text())
    b = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert b["settings"]["maps"]["channel_reduction"] == {"vanilla": "none",
                                                          "integrated_gradients": "sum"}
    # random-logit must re-explain: impossible for maps from a file, so skipped and said
    assert {k["metric"]: k["reason"] for k in b["skipped"]}["random-logit"].startswith(
        "needs to re-explain")
    assert "skipped: random-logit: needs to re-explain" in stderr
    assert "skipped: input-invariance: needs to re-explain" in stderr
    assert list(b["scores"]) == [c for c in a["scores"] if c not in ("random-logit", "input-invariance")]
    for col, sc in b["scores"].items():
        for meth in METHODS:
            assert sc["methods"][meth]["per_image"] == a["scores"][col]["methods"][meth]["per_image"]
            assert sc["methods"][meth]["mean"] == a["scores"][col]["methods"][meth]["mean"]
            assert sc["methods"][meth]["ci"] == a["scores"][col]["methods"][meth]["ci"]


def test_maps_of_other_tools_with_any_key(tmp_path, data):
    """Keys that are no onnxsal method, with characters file names cannot hold; their
    [N, C, H, W] maps are summed over channels."""
    rng = np.random.default_rng(3)
    a, b = rng.random((N, 1, 20, 20)), rng.normal(size=(N, 20, 20))
    np.savez(tmp_path / "m.npz", **{"tool|a/b": a, "vendor map": b})
    res = run_evaluate(str(MODEL), str(SAMPLE), None, "sparseness,complexity", tmp_path / "o",
                       maps=tmp_path / "m.npz", limit=N, shard_size=SHARD, device="cpu",
                       threads=1, progress=False, bootstrap=50)
    assert res["settings"]["methods"] == ["tool|a/b", "vendor map"]
    assert res["settings"]["maps"]["channel_reduction"] == {"tool|a/b": "sum", "vendor map": "none"}
    got = [p["score"] for p in res["scores"]["sparseness"]["methods"]["tool|a/b"]["per_image"]]
    want = metrics.get("sparseness")()(None, data.images, a[:, 0].astype(np.float32))["per_image"]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_channel_reduction_rule():
    a = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(reduce_channels(a, "sum"), a.sum(axis=1), atol=1e-6)
    np.testing.assert_array_equal(reduce_channels(a, "max-abs"), np.abs(a).max(axis=1))
    f = Path(os.environ.get("TMPDIR", "/tmp")) / f"onnxsal-red-{os.getpid()}.npz"
    try:
        np.savez(f, vanilla=a, original=np.abs(a), my_tool=a)
        got, rules = load_maps(f, None, 2, (4, 5), 3)
    finally:
        f.unlink()
    assert rules == {"vanilla": "sum", "original": "max-abs", "my_tool": "sum"}
    np.testing.assert_array_equal(got["original"], np.abs(a).max(axis=1))


def test_bootstrap_interval_contains_the_mean_shrinks_and_matches_numpy():
    rng = np.random.default_rng(1)
    small, big = rng.normal(2.0, 1.0, 30), rng.normal(2.0, 1.0, 3000)
    ci_s, ci_b = bootstrap_ci(small, 2000, seed=0), bootstrap_ci(big, 2000, seed=0)
    assert ci_s[0] < small.mean() < ci_s[1] and ci_b[0] < big.mean() < ci_b[1]
    assert (ci_b[1] - ci_b[0]) < 0.2 * (ci_s[1] - ci_s[0])  # ~ 1/sqrt(100)
    # the percentile bootstrap by hand, with another generator: the same interval up to
    # Monte-Carlo error
    idx = np.random.default_rng(9).integers(0, len(small), (20000, len(small)))
    lo, hi = np.percentile(small[idx].mean(axis=1), [2.5, 97.5])
    width = ci_s[1] - ci_s[0]
    assert abs(ci_s[0] - lo) < 0.05 * width and abs(ci_s[1] - hi) < 0.05 * width
    assert bootstrap_ci(small, 2000, seed=0) == ci_s  # seeded
    assert bootstrap_ci(small[:1], 100) is None and bootstrap_ci(small, 0) is None
    with_nan = np.concatenate([small, [np.nan]])
    assert bootstrap_ci(with_nan, 2000, seed=0) == ci_s  # non-finite scores are left out


def test_interval_shrinks_with_more_images_in_evaluate(tmp_path):
    res = {n: run_evaluate(str(MODEL), str(SAMPLE), ["vanilla"], ["sparseness"], tmp_path / str(n),
                           limit=n, device="cpu", threads=1, progress=False, shard_size=64)
           for n in (16, 160)}
    w = {n: np.diff(r["scores"]["sparseness"]["methods"]["vanilla"]["ci"])[0]
         for n, r in res.items()}
    assert w[160] < 0.6 * w[16], w  # ~ sqrt(16/160) = 0.32


class _Counter:
    """Model runs on images (``n``): every onnxruntime run of an engine, less the one probe
    run each engine makes when it is built (it counts the classes on a zero image)."""

    def __init__(self, monkeypatch):
        self.runs = self.builds = 0
        run, init = Engine._run, Engine.__init__

        def counted(sess, names, feeds):
            self.runs += 1
            return run(sess, names, feeds)

        def built(eng, *a, **kw):
            self.builds += 1
            init(eng, *a, **kw)

        monkeypatch.setattr(Engine, "_run", staticmethod(counted))
        monkeypatch.setattr(Engine, "__init__", built)

    @property
    def n(self) -> int:
        return self.runs - self.builds


def _api(out, metrics_, **kw):
    return run_evaluate(str(MODEL), str(SAMPLE), ["vanilla", "original"], metrics_, out,
                        limit=N, shard_size=SHARD, device="cpu", threads=1, progress=False,
                        bootstrap=100, **kw)


def _mtimes(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in out.glob("shards/**/*.npz")}


def test_a_stopped_run_resumes_and_a_finished_one_recomputes_nothing(tmp_path, monkeypatch):
    ms = ["sparseness", "region-perturbation-morf"]
    whole = _api(tmp_path / "whole", ms)
    assert whole["complete"] and whole["timing"]["parts_total"] == 2 * 3 + 2 * 2 * 3
    out = tmp_path / "stopped"
    part = _api(out, ms, stop_after=5)
    assert part == {"complete": False, "parts": 18, "done": 5}
    assert not (out / "scores.json").exists()
    before = _mtimes(out)
    assert len(before) == 5
    count = _Counter(monkeypatch)
    res = _api(out, ms)
    assert count.n > 0 and res["timing"]["parts_computed_this_run"] == 13
    assert all(_mtimes(out)[p] == t for p, t in before.items())  # nothing finished rewritten
    for r in (res, whole):
        r.pop("timing")
    assert res == whole
    # the same arguments again: not one model run, no part rewritten
    count.runs = count.builds = 0
    before = _mtimes(out)
    again = _api(out, ms)
    assert count.n == 0 and again["timing"]["parts_computed_this_run"] == 0
    assert _mtimes(out) == before
    again.pop("timing")
    assert again == whole
    # another metric later: the stored maps are reused, only its own parts are computed
    more = _api(out, ms + ["complexity"])
    assert count.n == 0 and more["timing"]["parts_computed_this_run"] == 2 * 3
    assert list(more["scores"]) == ms + ["complexity"]


def test_accuracy_without_labels_is_skipped_and_allegiance_applies(tmp_path):
    with np.load(SAMPLE) as z:
        np.savez(tmp_path / "nolabels.npz", x=z["x"][:N])
    kw = dict(limit=N, shard_size=SHARD, device="cpu", threads=1, progress=False, bootstrap=50)
    args = (str(MODEL), str(tmp_path / "nolabels.npz"), ["vanilla"],
            ["black-white-deletion", "sparseness"])
    res = run_evaluate(*args, tmp_path / "a", **kw)
    assert [s["metric"] for s in res["skipped"]] == ["black-white-deletion"]
    assert "labels" in res["skipped"][0]["reason"] and list(res["scores"]) == ["sparseness"]
    res = run_evaluate(*args, tmp_path / "b", deletion_metric="allegiance", **kw)
    assert not res["skipped"] and "black-white-deletion:white" in res["scores"]


def test_no_methods_and_unknown_metric_are_one_line(tmp_path):
    code, _, err = evaluate_cli(tmp_path / "a", "--metrics", "sparseness")
    assert code == 2 and "no methods given" in one_error_line(err)
    code, _, err = evaluate_cli(tmp_path / "b", "-m", "vanilla", "--metrics", "nonesuch")
    assert code == 2 and "unknown metric 'nonesuch'" in one_error_line(err)


def _bad(tmp_path, name, **arrays):
    f = tmp_path / f"{name}.npz"
    np.savez(f, **arrays)
    return f


@pytest.mark.parametrize("case,expect", [
    ("wrong_n", "array 'vanilla' of shape [23, 20, 20]: expected at least 24 maps"),
    ("wrong_hw", "array 'vanilla' of shape [24, 20, 19]: expected at least 24 maps of 20x20"),
    ("wrong_c", "array 'vanilla' of shape [24, 3, 20, 20]: 3 channels; the images have 1"),
    ("nan", "array 'vanilla' of shape [24, 20, 20] has 1 NaN or infinite values"),
    ("inf", "array 'vanilla' of shape [24, 20, 20] has 2 NaN or infinite values"),
    ("text", "array 'vanilla' of shape [24, 20, 20] has dtype <U1, not numbers"),
    ("objects", "array 'vanilla' of shape [24] holds Python objects (pickled data is refused)"),
    ("flat", "array 'vanilla' of shape [480, 20]: expected [N, H, W] or [N, C, H, W] maps"),
    ("missing", "no array for method(s) gradcam (it has vanilla)"),
    ("not_npz", "not an .npz file"),
])
def test_bad_maps_are_one_line(tmp_path, case, expect):
    good = np.zeros((N, 20, 20), np.float32)
    extra = []
    if case == "wrong_n":
        f = _bad(tmp_path, case, vanilla=good[:-1])
    elif case == "wrong_hw":
        f = _bad(tmp_path, case, vanilla=good[:, :, :-1])
    elif case == "wrong_c":
        f = _bad(tmp_path, case, vanilla=np.zeros((N, 3, 20, 20)))
    elif case == "nan":
        g = good.copy()
        g[3, 4, 5] = np.nan
        f = _bad(tmp_path, case, vanilla=g)
    elif case == "inf":
        g = good.copy()
        g[0, 0, :2] = [np.inf, -np.inf]
        f = _bad(tmp_path, case, vanilla=g)
    elif case == "text":
        f = _bad(tmp_path, case, vanilla=np.full((N, 20, 20), "a"))
    elif case == "objects":
        f = _bad(tmp_path, case, vanilla=np.array([{"x": 1}] * N, dtype=object))
    elif case == "flat":
        f = _bad(tmp_path, case, vanilla=good.reshape(480, 20))
    elif case == "missing":
        f = _bad(tmp_path, case, vanilla=good)
        extra = ["-m", "gradcam"]
    else:
        f = tmp_path / "maps.npz"
        f.write_bytes(b"not a zip file")
    code, _, err = evaluate_cli(tmp_path / "out", "--maps", f, "--metrics", "sparseness", *extra)
    line = one_error_line(err)
    assert code == 2 and expect in line, line
