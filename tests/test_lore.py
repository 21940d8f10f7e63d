"""LORE for images on the bundled digits model: every counterfactual marked valid changes the
model's prediction (re-rendered and re-run here), the factual rule holds for the image, the
fidelity is the tree's agreement with the model on the neighbourhood (refitted here), the
genetic search batches its model calls, determinism, and one-line option errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.tree import DecisionTreeClassifier

from onnxsal import methods
from onnxsal.cli import cli
from onnxsal.engine import Engine
from onnxsal.errors import OptionError
from onnxsal.methods.lore import _vary, fitness

from test_hostile import run_main

DATA = Path(__file__).parent / "data"
OPTS = {"segmentation": "slic", "fill": 0.0}  # 35-44 superpixels, absent ones black


class Counting:
    """An engine that counts its calls and the images it is given."""

    def __init__(self, eng):
        self.eng, self.calls, self.images = eng, 0, 0

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def logits(self, x):
        self.calls += 1
        self.images += len(x)
        return self.eng.logits(x)


@pytest.fixture(scope="module")
def digits():
    eng = Engine(DATA / "digits_cnn.onnx", device="cpu", threads=1, use_disk_cache=False)
    with np.load(DATA / "digits_sample.npz", allow_pickle=False) as z:
        x = z["x"][::25].astype(np.float32) / 255.0  # 8 images, one or two per class
    return eng, x


@pytest.fixture(scope="module")
def explained(digits):
    eng, x = digits
    counting = Counting(eng)
    res = methods.get("lore")(counting, x, **OPTS)
    return res, counting


def _render(x, seg, z):
    return x[None] * z[seg][None, None]  # fill 0: absent superpixels black


def test_valid_counterfactuals_change_the_prediction(digits, explained):
    eng, x = digits
    res, _ = explained
    checked = valid = 0
    for i in range(len(x)):
        seg, r = res.info["segments"][i], res.info["explanations"][i]
        t = int(res.targets[i])
        for cf in r["counterfactuals"]:
            z = cf["features"]
            # the counterfactual image is the image with exactly the changed superpixels removed
            assert sorted(np.flatnonzero(~z).tolist()) == cf["changes"] and cf["n_changes"] == len(cf["changes"])
            # and it meets every condition of its rule, so it is in the rule's leaf
            assert all(z[p["superpixel"]] == p["kept"] for p in cf["premises"]) and cf["tree_leaf_reached"]
            assert cf["class"] != t
            pred = int(eng.logits(_render(x[i], seg, z)).argmax(1)[0])
            assert pred == cf["predicted"]
            assert cf["valid"] == (pred != t)
            checked += 1
            valid += cf["valid"]
        if r["counterfactuals"]:
            n = [cf["n_changes"] for cf in r["counterfactuals"]]
            assert n == sorted(n) and r["counterfactuals"][0]["minimal"]
    assert checked >= len(x) and valid >= checked // 2, (checked, valid)


def test_factual_rule_holds_for_the_image(digits, explained):
    eng, x = digits
    res, _ = explained
    for i in range(len(x)):
        seg, r = res.info["segments"][i], res.info["explanations"][i]
        fact = r["factual"]
        k = seg.max() + 1
        image_features = np.ones(k, bool)  # the image keeps every superpixel
        assert all(image_features[p["superpixel"]] == p["kept"] for p in fact["premises"])
        kept = [p["superpixel"] for p in fact["premises"] if p["kept"]]
        np.testing.assert_array_equal(res.maps[i], np.isin(seg, kept).astype(np.float32))
        # the rule's coverage and precision on the neighbourhood, recounted
        z, y = r["z"], r["y"]
        covered = np.all([z[:, p["superpixel"]] == p["kept"] for p in fact["premises"]], axis=0)
        assert fact["coverage"] == pytest.approx(covered.mean())
        assert fact["precision"] == pytest.approx((y[covered] == fact["class"]).mean())
        assert r["hit"] == (fact["class"] == int(eng.logits(x[i:i + 1]).argmax()))


def test_for_another_target_counterfactuals_reach_it(digits):
    eng, x = digits
    pred = eng.logits(x[:3]).argmax(1)
    other = (pred + 1) % 10
    res = methods.get("lore")(eng, x[:3], targets=other, **OPTS)
    valid = 0
    for i in range(3):
        r = res.info["explanations"][i]
        assert r["image_class"] == pred[i]
        for cf in r["counterfactuals"]:
            assert cf["class"] == other[i]
            got = int(eng.logits(_render(x[i], res.info["segments"][i], cf["features"])).argmax(1)[0])
            assert cf["valid"] == (got == other[i])
            valid += cf["valid"]
    assert valid >= 1  # the third digit (a 2) becomes a 3 by removing one superpixel


def test_fidelity_is_the_trees_agreement_on_the_neighbourhood(digits, explained):
    eng, x = digits
    res, _ = explained
    for i in range(len(x)):
        seg, r = res.info["segments"][i], res.info["explanations"][i]
        z, y = r["z"], r["y"]
        # the neighbourhood's labels are the model's classes
        np.testing.assert_array_equal(eng.logits(np.stack([_render(x[i], seg, row)[0] for row in z])).argmax(1), y)
        assert len(np.unique(z, axis=0)) == len(z) and z.all(axis=1).any()  # a set, with the image
        assert 0 <= r["fidelity"] <= 1 and 0 <= r["cv_fidelity"] <= 1
        tree = DecisionTreeClassifier(random_state=0).fit(z.astype(np.float32), y)
        assert r["fidelity"] == pytest.approx(tree.score(z.astype(np.float32), y))
        # both outcomes are searched for: at least a few samples of each
        assert 0 < r["same_outcome"] < len(z)
    np.testing.assert_allclose(res.info["fidelity"], [r["fidelity"] for r in res.info["explanations"]])


def test_a_shallow_tree_is_less_faithful(digits):
    eng, x = digits
    res = methods.get("lore")(eng, x[:3], max_depth=1, **OPTS)
    for r in res.info["explanations"]:
        tree = DecisionTreeClassifier(max_depth=1, random_state=0).fit(r["z"].astype(np.float32), r["y"])
        assert r["fidelity"] == pytest.approx(tree.score(r["z"].astype(np.float32), r["y"]))
        assert r["tree_depth"] <= 1 and len(r["factual"]["premises"]) <= 1
    assert min(r["fidelity"] for r in res.info["explanations"]) < 1


def test_model_calls_are_batched_per_generation(explained):
    res, counting = explained
    n = len(res.targets)
    calls = res.info["engine_calls"]
    # the first image, one call per generation with new genomes, one to check the counterfactuals
    assert (calls <= 10 + 2).all() and calls.sum() == counting.calls - 1  # - 1: the targets' logits
    assert res.info["evaluations"].sum() == counting.images - n
    for r in res.info["explanations"]:
        assert sum(r["evaluations_per_generation"]) + r["check_evaluations"] == r["evaluations"]
        # a genome is evaluated once: never more than the population per generation
        assert max(r["evaluations_per_generation"]) <= 1000


def test_fitness_and_variation_by_hand():
    z = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], bool)
    cls = np.array([3, 3, 5])
    np.testing.assert_allclose(fitness(z, cls, 3, True), [1 + 1 - 1, 1 + 0.75, 0 + 0])
    np.testing.assert_allclose(fitness(z, cls, 3, False), [0 + 1 - 1, 0 + 0.75, 1 + 0])
    rng = np.random.default_rng(0)
    pop = np.zeros((6, 8), bool)
    pop[1::2] = True
    o = {"crossover": 1.0, "mutation": 0.0, "gene_mutation": 0.0}
    out, changed = _vary(rng, pop, o)
    assert changed.all()
    # two-point crossover of every pair: one contiguous block swapped, the columns' contents kept
    np.testing.assert_array_equal(out[0::2] ^ out[1::2], np.ones((3, 8), bool))
    for row in out[0::2]:
        assert 1 <= row.sum() <= 7 and np.count_nonzero(np.diff(row.astype(int))) <= 2
    o = {"crossover": 0.0, "mutation": 0.0, "gene_mutation": 1.0}
    out, changed = _vary(rng, pop, o)
    np.testing.assert_array_equal(out, pop)  # no individual mutated
    assert not changed.any()


def test_without_the_cache_the_same_explanation_costs_more_evaluations(digits, explained):
    eng, x = digits
    res, _ = explained
    plain = methods.get("lore")(eng, x[:2], cache=False, **OPTS)
    for i in range(2):
        a, b = res.info["explanations"][i], plain.info["explanations"][i]
        np.testing.assert_array_equal(a["z"], b["z"])
        np.testing.assert_array_equal(a["y"], b["y"])
        assert a["factual"] == b["factual"] and a["fidelity"] == b["fidelity"]
        assert b["evaluations"] > 2 * a["evaluations"]
        assert b["evaluations_per_generation"][0] == 1000  # the whole first population


def test_deterministic_with_a_seed(digits, explained):
    eng, x = digits
    res, _ = explained
    again = methods.get("lore")(eng, x[:3], **OPTS)
    other = methods.get("lore")(eng, x[:3], seed=1, **OPTS)
    for i in range(3):
        a, b = res.info["explanations"][i], again.info["explanations"][i]
        assert a["factual"] == b["factual"] and a["fidelity"] == b["fidelity"]
        assert [cf["changes"] for cf in a["counterfactuals"]] == [cf["changes"] for cf in b["counterfactuals"]]
        np.testing.assert_array_equal(a["z"], b["z"])
    np.testing.assert_array_equal(again.maps, res.maps[:3])
    assert any(not np.array_equal(res.info["explanations"][i]["z"], other.info["explanations"][i]["z"])
               for i in range(3))


@pytest.mark.parametrize("opts, match", [
    ({"population": 1}, "population=1"), ({"mutation": 1.5}, "mutation=1.5"), ({"tournament": 0}, "tournament"),
    ({"generations": "x"}, "integers"), ({"max_depth": 0}, "max_depth=0"), ({"segmentation": "felzenszwalb"},
                                                                           "lore segmentation"),
    ({"fill": "grey"}, "lore fill.*superpixel_mean"), ({"min_samples_leaf": 0.7}, "min_samples_leaf"),
    ({"cache": "no"}, "cache must be true or false")])
def test_option_errors_are_one_line(digits, opts, match):
    eng, x = digits
    with pytest.raises(OptionError, match=match) as err:
        methods.get("lore")(eng, x[:1], **opts)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("setting, match", [("lore.population=1", "population=1"),
                                            ("lore.colour=1", "has no option 'colour'"),
                                            ("lore", "METHOD.OPTION=VALUE"),
                                            ("anchor.tau=0.1", "not selected")])
def test_cli_option_errors_are_one_line(tmp_path, setting, match):
    code, out, err = run_main(["explain", DATA / "digits_cnn.onnx", DATA / "digits_sample.npz", "--limit", "1",
                               "-m", "lore", "--set", setting, "--out", tmp_path / "o", "--device", "cpu"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err + out
    assert match in lines[0], lines[0]


def test_cli_set_reaches_the_method(tmp_path):
    res = CliRunner().invoke(cli, ["explain", str(DATA / "digits_cnn.onnx"), str(DATA / "digits_sample.npz"),
                                   "--limit", "1", "-m", "lore", "--set", "lore.segmentation=slic",
                                   "--set", "lore.fill=0", "--set", "lore.generations=2", "--out", str(tmp_path / "o"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "o" / "maps.npz") as z:
        seg = z["x_0_/lore:segments"]
    assert seg.max() + 1 > 20  # slic's 35-44 superpixels, not quickshift's 3-8
