"""ROAD (noisy linear imputation, MoRF and LeRF) and IROF (superpixels removed in order of
mean relevance) faithfulness metrics (docs/faithfulness.md#road-road-morf-road-lerf and docs/faithfulness.md#irof-irof).

As in :mod:`onnxsal.metrics.faithfulness`, all the perturbed variants of a batch of images
go to ``predict_logits`` in one call, the target is the clean prediction and random draws are
seeded per image.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from ..errors import OptionError
from ..numeric import softmax
from .base import Metric
from .faithfulness import (
    BASELINES,
    _check_int,
    _CurveMetric,
    _finite_maps,
    baseline,
    image_rng,
    target_scores,
)
from .rise import pixel_order

#: (di, dj, weight) of the 8 neighbours in ROAD's noisy linear imputation (Rong et al. 2022)
NEIGHBOURS = ((0, 1, 1 / 6), (0, -1, 1 / 6), (1, 0, 1 / 6), (-1, 0, 1 / 6),
              (1, 1, 1 / 12), (1, -1, 1 / 12), (-1, 1, 1 / 12), (-1, -1, 1 / 12))
PERCENTAGES: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))  # 0.1, ..., 0.9


def linear_impute(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """[C, H, W]: ``image`` with each missing pixel set so that it equals the weighted mean of
    its in-image 8 neighbours (missing ones included), one sparse system solved for all
    channels (scipy.sparse.linalg.spsolve). Needs at least one known pixel."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = image.shape
    miss = missing.reshape(-1)
    if miss.all():
        raise OptionError("linear imputation needs at least one known pixel")
    m = int(miss.sum())
    unknown = np.full(h * w, -1, np.int64)
    unknown[miss] = np.arange(m)
    pi, pj = np.divmod(np.flatnonzero(miss), w)
    flat = image.reshape(c, h * w).astype(np.float64)
    diag = np.zeros(m)
    rhs = np.zeros((m, c))
    rows, cols, vals = [np.arange(m)], [np.arange(m)], []
    for di, dj, wt in NEIGHBOURS:
        qi, qj = pi + di, pj + dj
        inside = (qi >= 0) & (qi < h) & (qj >= 0) & (qj < w)
        p = np.flatnonzero(inside)
        q = qi[inside] * w + qj[inside]
        diag[p] += wt
        qm = miss[q]
        rows.append(p[qm])
        cols.append(unknown[q[qm]])
        vals.append(np.full(int(qm.sum()), -wt))
        np.add.at(rhs, p[~qm], wt * flat[:, q[~qm]].T)
    a = coo_matrix((np.concatenate([diag] + vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(m, m)).tocsc()
    sol = np.asarray(spsolve(a, rhs)).reshape(m, c)
    out = flat.copy()
    out[:, miss] = sol.T
    return out.reshape(c, h, w).astype(np.float32)


class RoadMoRF(_CurveMetric):
    """ROAD (Rong et al. 2022), most relevant first: the k = round(p H W) most relevant pixels
    are imputed by noisy linear imputation; the target logit should fall (lower AUC)."""

    name = "road-morf"
    direction: Literal["lower", "higher"] = "lower"
    lerf = False

    def __init__(self, percentages=PERCENTAGES, noise: float = 0.01, seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        ps = [float(p) for p in percentages]
        if not ps or any(not 0.0 < p < 1.0 for p in ps) or sorted(set(ps)) != ps:
            raise OptionError(f"ROAD percentages must rise strictly within (0, 1), got {ps}")
        if not math.isfinite(float(noise)) or float(noise) < 0:
            raise OptionError(f"noise must be a finite number >= 0, got {noise!r}")
        self.percentages = ps
        self.noise = float(noise)
        self.seed = _check_int("seed", seed, 0)
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"percentages": self.percentages, "noise": self.noise, "seed": self.seed}

    def bytes_per_image(self, shape) -> int:
        return 2 * (len(self.percentages) + 1) * 4 * math.prod(shape)

    def variants(self, x: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """[N, P, C, H, W]: each image with its top (or bottom) round(p H W) pixels imputed."""
        n, c, h, w = x.shape
        rank = pixel_order(-maps if self.lerf else maps).reshape(n, h, w)
        out = np.empty((n, len(self.percentages), c, h, w), np.float32)
        for i in range(n):
            rng = image_rng(self.seed, x[i])
            for t, p in enumerate(self.percentages):
                gone = rank[i] < int(round(p * h * w))
                out[i, t] = linear_impute(x[i], gone)
                out[i, t][:, gone] += (self.noise * rng.standard_normal((c, int(gone.sum())))
                                       ).astype(np.float32)
        return out

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        """Curve: the clean logit then one point per percentage; ``value``: its trapezoid AUC
        over x = (0, percentages...)."""
        maps = np.asarray(maps, np.float64)
        n = len(images)
        curve = np.full((n, len(self.percentages) + 1), np.nan)
        ok = _finite_maps(maps)
        if ok.any():
            clean, scores = target_scores(predict_logits, images[ok],
                                          self.variants(images[ok], maps[ok]))
            curve[ok] = np.concatenate([clean[:, None], scores], axis=1)
        value = np.trapezoid(curve, x=[0.0] + self.percentages, axis=1)
        return {"value": value, "curve": curve}

    def summarize(self, result, names: list[str]) -> dict:
        out = super().summarize(result, names)
        out["x"] = [0.0] + self.percentages
        return out


class RoadLeRF(RoadMoRF):
    """ROAD, least relevant first: the target logit should stay (higher AUC)."""

    name = "road-lerf"
    direction = "higher"
    lerf = True


class IROF(Metric):
    """IROF (Rieger & Hansen 2020): SLIC superpixels removed (set to the image's mean) in
    descending mean relevance; the value is the area over the curve of the target's softmax
    probability relative to the clean one, x evenly on [0, 1] (higher is better)."""

    name = "irof"
    direction = "higher"

    def __init__(self, segments: int = 50, compactness: float = 10.0, baseline: str = "mean",
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        self.segments = _check_int("segments", segments, 2)
        if baseline not in BASELINES:
            raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{baseline}'")
        self.compactness = float(compactness)
        self.baseline = baseline
        self.seed = _check_int("seed", seed, 0)
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"segments": self.segments, "compactness": self.compactness,
                "baseline": self.baseline, "seed": self.seed}

    def bytes_per_image(self, shape) -> int:
        return 2 * (2 * self.segments + 1) * 4 * math.prod(shape)

    def superpixels(self, image: np.ndarray) -> np.ndarray:
        """int [H, W] labels 0..S-1 of skimage.segmentation.slic on the [C, H, W] image."""
        from skimage.segmentation import slic

        lab = slic(np.moveaxis(image, 0, -1).astype(np.float64), n_segments=self.segments,
                   compactness=self.compactness, start_label=0, channel_axis=-1)
        return np.unique(lab, return_inverse=True)[1].reshape(lab.shape)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        maps = np.asarray(maps, np.float64)
        value = np.full(len(images), np.nan)
        ok = np.flatnonzero(_finite_maps(maps))
        if not len(ok):
            return {"value": value}
        x = images[ok]
        base = baseline(x, self.baseline, self.seed)
        variants, sizes = [], []
        for i, xi in enumerate(x):
            lab = self.superpixels(xi)
            s = int(lab.max()) + 1
            mean = np.bincount(lab.ravel(), maps[ok[i]].ravel(), s) / np.bincount(lab.ravel())
            rank = pixel_order(mean[None])[0][lab]  # [H, W]: 0 = most relevant segment
            gone = rank[None] < np.arange(1, s + 1)[:, None, None]  # [S, H, W]
            variants.append(np.where(gone[:, None], base[i][None], xi[None]))
            sizes.append(s)
        batch = np.concatenate([x] + variants)
        prob = softmax(np.asarray(predict_logits(batch)), np.float64)
        target = prob[:len(x)].argmax(axis=1)
        off = len(x)
        for i, s in enumerate(sizes):
            rel = np.concatenate([[1.0], prob[off:off + s, target[i]] / prob[i, target[i]]])
            value[ok[i]] = 1.0 - np.trapezoid(rel, x=np.linspace(0.0, 1.0, s + 1))
            off += s
        return {"value": value}
