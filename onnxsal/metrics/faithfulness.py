"""Faithfulness metrics: region perturbation (MoRF, LeRF, ABPC), faithfulness correlation,
sensitivity-n, monotonicity and infidelity (docs/faithfulness.md).

Each metric perturbs every image of a batch in many ways, stacks all the variants and sends
them through ``predict_logits`` in one call (the base pipeline sizes the batches from
:meth:`Metric.bytes_per_image`). The score is the logit of the target class, the class the
model predicts on the clean image (the class the maps explain). Random choices are seeded
per image from ``seed`` and the image's bytes, so a result never depends on the batching.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric, PredictLogits
from .rise import baseline_images, pixel_order

BASELINES = ("black", "mean", "uniform")


def image_rng(seed: int, image: np.ndarray, *stream: int) -> np.random.Generator:
    """A generator seeded by ``seed``, the image's bytes (so independent of its position in a
    batch) and optional ``stream`` numbers (e.g. a subset size)."""
    crc = zlib.crc32(np.ascontiguousarray(image).tobytes())
    return np.random.default_rng([int(seed), crc, *map(int, stream)])


def baseline(x: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """[N, C, H, W] replacement values: black (0), the per-channel mean, or uniform noise in
    [0, 1) seeded per image."""
    if kind == "uniform":
        return np.stack([image_rng(seed, xi).random(xi.shape, np.float32) for xi in x])
    if kind not in BASELINES:
        raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{kind}'")
    return baseline_images(x, kind)


def target_scores(predict_logits: PredictLogits, x: np.ndarray, variants: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(clean target logits [N], target logits of the variants [N, T]) from one model call;
    the target is the class predicted on the clean image."""
    n, t = variants.shape[:2]
    return batch_scores(predict_logits, np.concatenate([x, variants.reshape((n * t,) + x.shape[1:])]),
                        n, t)


def stacked(x: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch [N + N T, C, H, W], its variants view [N, T, C, H, W]): the clean images first,
    room for ``t`` variants of each after them, filled in place (no concatenation)."""
    n = len(x)
    batch = np.empty((n + n * t,) + x.shape[1:], x.dtype)
    batch[:n] = x
    return batch, batch[n:].reshape((n, t) + x.shape[1:])


def batch_scores(predict_logits: PredictLogits, batch: np.ndarray, n: int, t: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`target_scores` of a batch already stacked: N clean images, then T variants of
    each."""
    logits = np.asarray(predict_logits(batch), np.float64)
    if logits.ndim != 2 or logits.shape[0] != len(batch):
        raise InputError(f"the model returned logits of shape {logits.shape} for "
                         f"{len(batch)} images")
    target = logits[:n].argmax(axis=1)
    return logits[np.arange(n), target], logits[n:].reshape(n, t, -1)[np.arange(n), :, target]


def step_counts(k: int, steps: int) -> np.ndarray:
    """0 = c_0 < ... < c_T = k: at most ``steps`` evenly spaced steps through k features."""
    return np.unique(np.round(np.linspace(0, k, min(k, steps) + 1)).astype(np.int64))


def tile_sums(maps: np.ndarray, patch: int) -> np.ndarray:
    """[N, ceil(H/p) * ceil(W/p)]: the sum of the map over each patch of a p x p grid."""
    n, h, w = maps.shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    pad = np.zeros((n, gh * patch, gw * patch), np.float64)
    pad[:, :h, :w] = maps
    return pad.reshape(n, gh, patch, gw, patch).sum(axis=(2, 4)).reshape(n, gh * gw)


def tile_of_pixel(h: int, w: int, patch: int) -> np.ndarray:
    """int [H*W]: the patch index of each pixel (row-major grid)."""
    i, j = np.meshgrid(np.arange(h) // patch, np.arange(w) // patch, indexing="ij")
    return (i * math.ceil(w / patch) + j).reshape(-1)


def _check_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise OptionError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _finite_maps(maps: np.ndarray) -> np.ndarray:
    return np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)


class _CurveMetric(Metric):
    """A per-image curve of target logits over the steps (``curve``, its mean in the summary)
    and a per-image ``value`` from it."""

    arrays: tuple[str, ...] = ("value", "curve")

    def aggregate(self, parts: list):
        res = super().aggregate(parts)
        curves = np.concatenate([np.asarray(p["curve"], np.float64) for p in parts])
        ok = np.isfinite(res["per_image"])
        res["curve"] = (curves[ok].mean(axis=0) if ok.any()
                        else np.full(curves.shape[1], np.nan))
        return res

    def summarize(self, result, names: list[str]) -> dict:
        out = super().summarize(result, names)
        out["x"] = np.linspace(0.0, 1.0, len(result["curve"])).tolist()
        out["curve"] = [float(v) for v in result["curve"]]
        return out


class RegionPerturbationMoRF(_CurveMetric):
    """Region perturbation (Samek et al. 2017; pixel flipping of Bach et al. 2015 at patch 1):
    remove the most relevant patches first; the target logit should fall fast (lower AUC)."""

    name = "region-perturbation-morf"
    direction: Literal["lower", "higher"] = "lower"
    orders: tuple[bool, ...] = (False,)  # LeRF?

    def __init__(self, patch: int = 4, steps: int = 16, baseline: str = "black", seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        if baseline not in BASELINES:
            raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{baseline}'")
        self.patch = _check_int("patch", patch)
        self.steps = _check_int("steps", steps)
        self.seed = _check_int("seed", seed, 0)
        self.baseline = baseline
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"patch": self.patch, "steps": self.steps, "baseline": self.baseline,
                "seed": self.seed}

    def bytes_per_image(self, shape) -> int:
        c, h, w = shape
        k = math.ceil(h / self.patch) * math.ceil(w / self.patch)
        return 2 * (len(self.orders) * len(step_counts(k, self.steps)) + 1) * 4 * c * h * w

    def variants(self, x: np.ndarray, maps: np.ndarray, lerf: bool) -> np.ndarray:
        """[N, T, C, H, W]: each image after removing c_t patches (MoRF or LeRF order)."""
        n, c, h, w = x.shape
        sums = tile_sums(maps, self.patch)
        rank = pixel_order(-sums if lerf else sums)  # [N, K]: 0 = removed first
        counts = step_counts(sums.shape[1], self.steps)
        prank = rank[:, tile_of_pixel(h, w, self.patch)].reshape(n, h, w)
        gone = prank[:, None] < counts[None, :, None, None]  # [N, T, H, W]
        base = baseline(x, self.baseline, self.seed)
        return np.where(gone[:, :, None], base[:, None], x[:, None])

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        """The curves of every order (MoRF, LeRF or both) of the batch from one model call;
        ``value`` is the AUC on x in [0, 1] (for both orders: LeRF minus MoRF)."""
        maps = np.asarray(maps, np.float64)
        ok = _finite_maps(maps)
        n, _, h, w = images.shape
        t = len(step_counts(math.ceil(h / self.patch) * math.ceil(w / self.patch), self.steps))
        curves = np.full((len(self.orders), n, t), np.nan)
        if ok.any():
            x, m = images[ok], maps[ok]
            batch, var = stacked(x, len(self.orders) * (t - 1))
            for o, lerf in enumerate(self.orders):
                var[:, o * (t - 1):(o + 1) * (t - 1)] = self.variants(x, m, lerf)[:, 1:]
            clean, scores = batch_scores(predict_logits, batch, len(x), var.shape[1])
            for o in range(len(self.orders)):
                curves[o, ok] = np.concatenate(
                    [clean[:, None], scores[:, o * (t - 1):(o + 1) * (t - 1)]], axis=1)
        curve = curves[-1] - curves[0] if len(self.orders) == 2 else curves[0]
        value = np.trapezoid(curve, x=np.linspace(0.0, 1.0, t), axis=1)
        return {"value": value, "curve": curve}


class RegionPerturbationLeRF(RegionPerturbationMoRF):
    """Region perturbation, least relevant patches first: the logit should stay (higher AUC)."""

    name = "region-perturbation-lerf"
    direction = "higher"
    orders = (True,)


class ABPC(RegionPerturbationMoRF):
    """Area between the LeRF and MoRF curves (AUC LeRF - AUC MoRF; higher is better)."""

    name = "abpc"
    direction = "higher"

    orders = (False, True)


class FaithfulnessCorrelation(Metric):
    """Faithfulness correlation (Bhatt et al. 2020): the Pearson correlation, over ``runs``
    random subsets of ``subset`` pixels, between the sum of the map over the subset and the
    drop of the target logit when the subset is set to the baseline (higher is better)."""

    name = "faithfulness-correlation"
    direction = "higher"

    def __init__(self, subset: float = 0.1, runs: int = 100, baseline: str = "black",
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        if baseline not in BASELINES:
            raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{baseline}'")
        if not 0.0 < float(subset) < 1.0:
            raise OptionError(f"subset must be a fraction of the pixels in (0, 1), got {subset!r}")
        self.subset = float(subset)
        self.runs = _check_int("runs", runs, 2)
        self.seed = _check_int("seed", seed, 0)
        self.baseline = baseline
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"subset": self.subset, "runs": self.runs, "baseline": self.baseline,
                "seed": self.seed}

    @property
    def fractions(self) -> list[float]:
        """The subset sizes, as fractions of the pixels, one correlation each."""
        return [self.subset]

    def bytes_per_image(self, shape) -> int:
        return 2 * (len(self.fractions) * self.runs + 1) * 4 * math.prod(shape)

    def subsets(self, images: np.ndarray, fraction: float | None = None) -> np.ndarray:
        """bool [N, R, H*W]: ``runs`` random subsets of max(1, round(fraction * H*W)) pixels
        (default fraction: ``subset``)."""
        n, _, h, w = images.shape
        size = max(1, round((self.subset if fraction is None else fraction) * h * w))
        out = np.zeros((n, self.runs, h * w), bool)
        for i, xi in enumerate(images):  # the first `size` of a random permutation per run
            # the `size` smallest draws: the same set a full argsort's first `size` holds (the
            # draws are distinct doubles), at a partial sort's cost
            pick = np.argpartition(image_rng(self.seed, xi, size).random((self.runs, h * w)),
                                   size - 1, axis=1)
            np.put_along_axis(out[i], pick[:, :size], True, axis=1)
        return out

    def correlations(self, predict_logits, images, maps) -> np.ndarray:
        """[N, F]: per image and subset fraction, Pearson's r between the map's sum over the
        subset and the drop of the target logit; every subset of the batch in one call."""
        maps = np.asarray(maps, np.float64)
        n, c, h, w = images.shape
        corr = np.full((n, len(self.fractions)), np.nan)
        ok = _finite_maps(maps)
        if not ok.any():
            return corr
        x, m = images[ok], maps[ok].reshape(-1, h * w)
        fr = self.fractions
        sub = np.concatenate([self.subsets(x, f) for f in fr], axis=1)
        gone = sub.reshape(len(x), sub.shape[1], 1, h, w)
        base = baseline(x, self.baseline, self.seed)
        batch, variants = stacked(x, sub.shape[1])
        for i in range(len(x)):  # image by image: the temporaries stay small
            variants[i] = np.where(gone[i], base[i], x[i])
        clean, scores = batch_scores(predict_logits, batch, len(x), sub.shape[1])
        drop = (clean[:, None] - scores).reshape(len(x), len(fr), self.runs)
        att = np.stack([(si * mi).sum(axis=1) for si, mi in zip(sub, m, strict=True)]
                       ).reshape(len(x), len(fr), self.runs)
        corr[ok] = [[pearson(a, d) for a, d in zip(ai, di, strict=True)]
                    for ai, di in zip(att, drop, strict=True)]
        return corr

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        return {"value": self.correlations(predict_logits, images, maps)[:, 0]}


class SensitivityN(_CurveMetric, FaithfulnessCorrelation):
    """Sensitivity-n (Ancona et al. 2018): faithfulness correlation at several subset sizes n
    (``fractions`` of the pixels); the curve is r against n, ``value`` its mean."""

    name = "sensitivity-n"
    direction = "higher"

    def __init__(self, fractions=(0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8), runs: int = 50,
                 baseline: str = "black", seed: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(0.1, runs, baseline, seed, max_batch_bytes)
        fs = [float(f) for f in fractions]
        if not fs or any(not 0.0 < f < 1.0 for f in fs) or sorted(set(fs)) != fs:
            raise OptionError(f"sensitivity-n fractions must rise strictly within (0, 1), got {fs}")
        self._fractions = fs

    @property
    def fractions(self) -> list[float]:
        return self._fractions

    def settings(self) -> dict:
        return {"fractions": self.fractions, "runs": self.runs, "baseline": self.baseline,
                "seed": self.seed}

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        curve = self.correlations(predict_logits, images, maps)
        return {"value": curve.mean(axis=1), "curve": curve}

    def summarize(self, result, names: list[str]) -> dict:
        out = super().summarize(result, names)
        out["x"] = list(self.fractions)
        return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r (scipy.stats.pearsonr); NaN when either side is constant."""
    from scipy.stats import pearsonr

    if np.ptp(a) == 0 or np.ptp(b) == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(pearsonr(a, b).statistic)


class Monotonicity(_CurveMetric):
    """Monotonicity (Arya et al. 2019, as Quantus's ``Monotonicity``): start from the baseline
    and put the pixels back in increasing order of |map|, ``steps`` groups; the value is 1
    when the target logit never decreases along the way, else 0 (higher is better)."""

    name = "monotonicity"
    direction = "higher"

    def __init__(self, steps: int = 16, baseline: str = "black", seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        if baseline not in BASELINES:
            raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{baseline}'")
        self.steps = _check_int("steps", steps)
        self.seed = _check_int("seed", seed, 0)
        self.baseline = baseline
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"steps": self.steps, "baseline": self.baseline, "seed": self.seed}

    def bytes_per_image(self, shape) -> int:
        return 2 * (self.steps + 2) * 4 * math.prod(shape)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        maps = np.asarray(maps, np.float64)
        n, c, h, w = images.shape
        counts = step_counts(h * w, self.steps)
        curve = np.full((n, len(counts)), np.nan)
        ok = _finite_maps(maps)
        if ok.any():
            x = images[ok]
            rank = pixel_order(-np.abs(maps[ok])).reshape(-1, h, w)  # 0 = smallest |map|
            back = rank[:, None] < counts[None, :, None, None]  # [n, T, H, W]
            variants = np.where(back[:, :, None], x[:, None],
                                baseline(x, self.baseline, self.seed)[:, None])
            _, curve[ok] = target_scores(predict_logits, x, variants)
        value = np.where(np.isfinite(curve).all(axis=1),
                         (np.diff(curve, axis=1) >= 0).all(axis=1).astype(np.float64), np.nan)
        return {"value": value, "curve": curve}


class Infidelity(Metric):
    """Infidelity (Yeh et al. 2019): E[(beta a.I - (f(x) - f(x - I)))^2] over ``runs`` Gaussian
    perturbations I (std ``sigma`` per pixel, all channels alike), beta the least-squares scale
    of the map as in the authors' code (lower is better)."""

    name = "infidelity"
    direction = "lower"

    def __init__(self, sigma: float = 0.1, runs: int = 50, seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        if not (math.isfinite(float(sigma)) and float(sigma) > 0):
            raise OptionError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.runs = _check_int("runs", runs, 1)
        self.seed = _check_int("seed", seed, 0)
        self.max_batch_bytes = int(max_batch_bytes)

    def settings(self) -> dict:
        return {"sigma": self.sigma, "runs": self.runs, "seed": self.seed}

    def bytes_per_image(self, shape) -> int:
        return 2 * (self.runs + 1) * 4 * math.prod(shape)

    def perturbations(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, R, H, W]: the perturbations I, seeded per image."""
        n, _, h, w = images.shape
        return np.stack([self.sigma * image_rng(self.seed, xi).standard_normal((self.runs, h, w))
                         for xi in images]).astype(np.float32)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        maps = np.asarray(maps, np.float64)
        value = np.full(len(images), np.nan)
        ok = _finite_maps(maps)
        if not ok.any():
            return {"value": value}
        x = images[ok]
        pert = self.perturbations(x)
        clean, scores = target_scores(predict_logits, x, x[:, None] - pert[:, :, None])
        drop = clean[:, None] - scores  # [n, R]
        dot = (pert * maps[ok][:, None]).sum(axis=(2, 3))  # a . I
        denom = (dot * dot).mean(axis=1)
        beta = np.divide((dot * drop).mean(axis=1), denom, out=np.zeros_like(denom),
                         where=denom > 0)
        value[ok] = ((beta[:, None] * dot - drop) ** 2).mean(axis=1)
        return {"value": value}
