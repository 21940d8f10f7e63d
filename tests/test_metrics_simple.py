"""Map-only and localisation metrics (docs/metrics.md) on tiny maps whose values are worked
out by hand or by an independent formula here; and the mask loader's three formats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxsal.errors import InputError, OptionError
from onnxsal.metrics import base as metrics
from onnxsal.metrics.complexity import Complexity, EffectiveComplexity, Sparseness
from onnxsal.metrics.localisation import (
    AttributionLocalisation,
    LocalisationAUC,
    PointingGame,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
)
from onnxsal.metrics.masks import load_masks


def _no_model(x):
    raise AssertionError("a map-only metric must not call the model")


def _images(maps):
    return np.zeros((len(maps), 1, *np.shape(maps)[1:]), np.float32)


def run(metric, maps):
    maps = np.asarray(maps, np.float64)
    return metric(_no_model, _images(maps), maps)["per_image"]


def test_sparseness_is_the_gini_index_by_hand():
    # |map| = [0, 0, 0, 4]: mean abs difference form: sum|ai-aj| = 2*3*4 = 24,
    # / (2 n^2 mean) = 24 / (2*16*1) = 0.75; a flat map: 0; signs do not matter
    maps = [[[0, 0], [0, -4]], [[2, 2], [2, 2]], [[1, -2], [3, 4]]]
    got = run(Sparseness(), maps)
    a = np.array([1, 2, 3, 4.0])
    ref3 = np.abs(a[:, None] - a[None]).sum() / (2 * 16 * a.mean())  # = 20 / (2*16*2.5) = 0.25
    np.testing.assert_allclose(got, [0.75, 0.0, ref3], atol=1e-12)
    assert ref3 == pytest.approx(0.25)


def test_complexity_is_the_entropy_of_the_normalised_map():
    maps = [[[1, 1], [1, 1]], [[0, 0], [0, 5]], [[1, -1], [2, 0]]]
    got = run(Complexity(), maps)
    p = np.array([0.25, 0.25, 0.5])
    np.testing.assert_allclose(got, [math.log(4), 0.0, -(p * np.log(p)).sum()], atol=1e-12)


def test_effective_complexity_counts_pixels_above_eps_of_the_max():
    maps = [[[1e-7, 0], [0.5, -1]], [[1, 1], [1, 1]]]
    np.testing.assert_array_equal(run(EffectiveComplexity(), maps), [2, 4])
    np.testing.assert_array_equal(run(EffectiveComplexity(eps=0.6), maps), [1, 4])
    with pytest.raises(OptionError):
        EffectiveComplexity(eps=1.5)


def test_undefined_maps_are_failures_not_averaged():
    maps = np.array([[[0, 0], [0, 0]], [[np.nan, 1], [1, 1]], [[0, 0], [0, 1]]])
    for m in (Sparseness(), Complexity(), EffectiveComplexity()):
        res = m(_no_model, _images(maps), maps)
        assert np.isnan(res["per_image"][:2]).all() and res["valid_images"] == 1
        assert m.summarize(res, ["a", "b", "c"])["failures"][0]["name"] == "a"


# -- localisation -----------------------------------------------------------------------
MAP = np.array([[0.1, 0.9, 0.0, 0.0],
                [0.2, 0.5, -0.4, 0.0],
                [0.0, 0.0, 0.3, 0.0],
                [0.0, 0.0, 0.0, 0.8]])
MASK = np.zeros((4, 4), bool)
MASK[0:2, 0:2] = True  # the top-left 2x2 block: 0.1, 0.9, 0.2, 0.5


def loc(metric_cls, m=MAP, k=MASK, **kw):
    return run(metric_cls(masks=np.asarray(k)[None], **kw), np.asarray(m)[None])[0]


def test_pointing_game_hit_miss_and_tolerance():
    assert loc(PointingGame) == 1.0  # max 0.9 at (0, 1) is inside
    k = np.zeros((4, 4), bool)
    k[3, 1] = True  # max at (0, 1) is 3 px away
    assert loc(PointingGame, k=k) == 0.0
    assert loc(PointingGame, k=k, tolerance=2) == 0.0
    assert loc(PointingGame, k=k, tolerance=3) == 1.0
    with pytest.raises(OptionError):
        PointingGame(tolerance=-1)


def test_relevance_mass_and_attribution_localisation_by_hand():
    inside, positive = 0.1 + 0.9 + 0.2 + 0.5, 0.1 + 0.9 + 0.2 + 0.5 + 0.3 + 0.8  # -0.4 ignored
    assert loc(RelevanceMassAccuracy) == pytest.approx(inside / positive)
    assert loc(AttributionLocalisation) == pytest.approx(inside / positive)
    assert loc(AttributionLocalisation, weighted=True) == pytest.approx(inside / positive * 16 / 4)


def test_relevance_rank_accuracy_by_hand():
    # K = 4; top 4 pixels: 0.9 (in), 0.8 (out), 0.5 (in), 0.3 (out) -> 2 / 4
    assert loc(RelevanceRankAccuracy) == pytest.approx(0.5)


def test_auc_equals_the_pairwise_definition():
    # AUC = P(score inside > score outside) + 0.5 P(tie), counted over all pairs
    s_in, s_out = MAP[MASK], MAP[~MASK]
    diff = s_in[:, None] - s_out[None]
    ref = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert loc(LocalisationAUC) == pytest.approx(ref)
    assert np.isnan(loc(LocalisationAUC, k=np.ones((4, 4), bool)))


def test_masks_follow_the_batches_and_are_checked():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(7, 4, 4))
    masks = rng.random((7, 4, 4)) > 0.5
    m = RelevanceMassAccuracy(masks=masks)
    m.max_batch_bytes = 2 * 4 * 16  # two images per batch
    assert len(list(m.batches(7, (1, 4, 4)))) == 4
    got = m(_no_model, _images(maps), maps)["per_image"]
    p = np.clip(maps, 0, None)
    np.testing.assert_allclose(got, (p * masks).sum((1, 2)) / p.sum((1, 2)))
    with pytest.raises(InputError, match="masks have shape"):
        RelevanceMassAccuracy(masks=masks[:3])(_no_model, _images(maps), maps)
    with pytest.raises(OptionError, match="needs ground-truth masks"):
        RelevanceMassAccuracy()(_no_model, _images(maps), maps)
    with pytest.raises(OptionError, match="needs ground-truth masks"):
        metrics.get("pointing-game").from_options({})
    pg = metrics.get("pointing-game").from_options({"masks": masks, "pointing_tolerance": 2})
    assert pg.settings() == {"tolerance": 2}


# -- the mask loader ----------------------------------------------------------------------
def test_load_masks_from_a_folder_of_pngs(tmp_path):
    import imageio.v3 as iio

    a = np.zeros((8, 8), np.uint8)
    a[2:4, 4:8] = 255
    iio.imwrite(tmp_path / "cat.png", a)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black: outside everywhere, whatever the alpha says
    iio.imwrite(tmp_path / "dog.png", rgba)
    got = load_masks(tmp_path, ["dog.jpg", "cat.jpg"], (4, 4))  # nearest-neighbour halving
    ref = np.zeros((2, 4, 4), bool)
    ref[1, 1, 2:4] = True
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(InputError, match="no mask image for 'cow.jpg'"):
        load_masks(tmp_path, ["cow.jpg"], (4, 4))


def test_load_masks_from_npz(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 1, 1] = 1
    np.savez(tmp_path / "m.npz", masks=arr, other=np.ones((2, 3, 3)))
    np.testing.assert_array_equal(load_masks(tmp_path / "m.npz", ["a", "b"], (3, 3)), arr != 0)
    assert load_masks(f"{tmp_path / 'm.npz'}:other", ["a", "b"], (3, 3)).all()
    with pytest.raises(InputError, match="expected \\[3, H, W\\]"):
        load_masks(tmp_path / "m.npz", ["a", "b", "c"], (3, 3))


def test_load_masks_from_a_csv_of_boxes(tmp_path):
    f = tmp_path / "boxes.csv"
    f.write_text("name,x0,y0,x1,y1\na.png,0,0,2,1\na.png,3,3,4,4\nb.png,1,1,3,3\n")
    got = load_masks(f, ["a.png", "b.png", "c.png"], (4, 4))
    ref = np.zeros((3, 4, 4), bool)
    ref[0, 0, 0:2] = True
    ref[0, 3, 3] = True
    ref[1, 1:3, 1:3] = True
    np.testing.assert_array_equal(got, ref)
    f.write_text("a.png,0,0,9,1\n")
    with pytest.raises(InputError, match="line 1"):
        load_masks(f, ["a.png"], (4, 4))
