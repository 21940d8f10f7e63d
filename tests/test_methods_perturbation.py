"""Occlusion, RISE and LIME: where the saliency goes on a model that sees one quadrant only,
plus their building blocks against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from onnxsal import methods
from onnxsal.engine import Engine
from onnxsal.methods.perturbation import rise_masks, superpixels, weighted_ridge

from conftest import export_torch

H = W = 32


class TopLeft(torch.nn.Module):
    """Class 0's logit grows with the content of the top-left quadrant; nothing else matters."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.abs_()
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]))
            self.fc.bias.zero_()

    def forward(self, x):
        q = x[:, :, : H // 2, : W // 2]
        return self.fc(torch.relu(self.conv(q)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def quadrant():
    torch.manual_seed(0)
    net = TopLeft().eval()
    rng = np.random.default_rng(0)
    # smooth-ish images: blocks of colour, so superpixels have something to follow
    x = np.repeat(np.repeat(rng.random((2, 3, 8, 8), dtype=np.float32), 4, 2), 4, 3)
    eng = Engine(export_torch(net, torch.from_numpy(x[:1])), device="cpu", threads=1,
                 use_disk_cache=False)
    assert (eng.predict(x) == 0).all()
    inside = np.zeros((H, W), bool)
    inside[: H // 2, : W // 2] = True
    return eng, x, inside


def concentration(m: np.ndarray, inside: np.ndarray, ref: float = 0.0) -> float:
    """mean |m - ref| inside the quadrant / mean |m - ref| outside it."""
    d = np.abs(m - ref)
    return float(d[inside].mean() / max(d[~inside].mean(), 1e-12))


def test_occlusion_is_zero_where_the_model_does_not_look(quadrant):
    eng, x, inside = quadrant
    res = methods.get("occlusion")(eng, x, window=4, stride=4)
    assert res.maps.shape == (2, H, W) and res.signed
    np.testing.assert_array_equal(res.maps[:, ~inside], 0)
    assert (res.maps[:, inside] > 0).mean() > 0.9  # removing content lowers class 0's logit


def test_rise_concentrates_on_the_quadrant(quadrant):
    eng, x, inside = quadrant
    res = methods.get("rise")(eng, x, masks=1000, seed=1)
    assert res.maps.shape == (2, H, W) and not res.signed
    for m in res.maps:
        outside_level = float(np.median(m[~inside]))
        assert concentration(m, inside, outside_level) > 3
        assert m[inside].mean() > outside_level  # kept content raises the score
    again = methods.get("rise")(eng, x, masks=1000, seed=1)
    np.testing.assert_array_equal(again.maps, res.maps)  # seeded


@pytest.mark.parametrize("segmentation", ["slic", "quickshift"])
def test_lime_concentrates_on_the_quadrant(quadrant, segmentation):
    eng, x, inside = quadrant
    res = methods.get("lime")(eng, x, samples=300, segmentation=segmentation, seed=0)
    assert res.maps.shape == (2, H, W) and res.signed
    for i, m in enumerate(res.maps):
        seg = res.info["segments"][i]
        # segments entirely outside the quadrant get (near) zero weight
        out_segs = [s for s in np.unique(seg) if not inside[seg == s].any()]
        in_segs = [s for s in np.unique(seg) if inside[seg == s].all()]
        assert out_segs and in_segs
        coef = res.info["coefficients"][i]
        assert np.abs(coef[out_segs]).max() < 0.2 * np.abs(coef[in_segs]).max()
        assert coef[in_segs].mean() > 0
        assert concentration(m, inside) > 3


def test_rise_masks_match_the_authors_recipe():
    """Our vectorised masks vs the authors' loop (one skimage resize per mask)."""
    count, size, grid, p, seed = 12, (30, 23), 5, 0.4, 3
    got = rise_masks(count, size, grid, p, seed)
    rng = np.random.default_rng(seed)
    cell = np.ceil(np.array(size) / grid).astype(int)
    up = (grid + 1) * cell
    grids = rng.random((count, grid, grid)) < p
    sy, sx = rng.integers(0, cell[0], count), rng.integers(0, cell[1], count)
    for i in range(count):
        full = resize(grids[i].astype(float), up, order=1, mode="reflect", anti_aliasing=False)
        np.testing.assert_allclose(got[i], full[sy[i]:sy[i] + size[0], sx[i]:sx[i] + size[1]],
                                   atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_weighted_ridge_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, (60, 7)).astype(float)
    y = z @ rng.normal(size=7) + 0.3 + 0.01 * rng.normal(size=60)
    w = rng.random(60)
    coef, icpt, r2 = weighted_ridge(z, y, w, alpha=1.0)
    ref = Ridge(alpha=1.0).fit(z, y, sample_weight=w)
    np.testing.assert_allclose(coef, ref.coef_, atol=1e-10)
    np.testing.assert_allclose(icpt, ref.intercept_, atol=1e-10)
    np.testing.assert_allclose(r2, ref.score(z, y, sample_weight=w), atol=1e-10)


def test_superpixels_are_contiguous_labels():
    img = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    for algo in ("slic", "quickshift"):
        seg = superpixels(img, algo, n_segments=20)
        assert seg.shape == (24, 24) and seg.max() >= 4, algo  # small images get segments too
        np.testing.assert_array_equal(np.unique(seg), np.arange(seg.max() + 1))
    grey = superpixels(img[:1], "slic", n_segments=20)
    assert grey.max() >= 4
