"""Similarity of two saliency maps, as the sanity checks use it (docs/definitions.md#similarity).

Normalisations (PAIR saliency conventions), per image:

* :func:`normalize_abs`: sum of absolute values over channels, then (s - min) / (p99 - min)
  clipped to [0, 1], where p99 is the 99th percentile (PAIR's ``VisualizeImageGrayscale``);
* :func:`normalize_signed`: sum over channels, divided by the 99th percentile of its absolute
  value, clipped to [-1, 1].

A map without spread (constant, all zeros) normalises to zeros, never NaN.

Similarities of one pair of maps ``a``, ``b`` ([C, H, W] or [H, W], raw method output):

* ``spearman_abs``: Spearman rank correlation of the absolute-normalised maps;
* ``spearman_signed``: Spearman rank correlation of the signed-normalised maps;
* ``ssim``: ``skimage.metrics.structural_similarity(gaussian_weights=True, data_range=1)`` on the
  absolute-normalised maps (window shrunk to the largest odd size <= the image side below 11 px);
* ``hog``: correlation (Pearson by default, Spearman on request; the paper's text says Pearson,
  the authors' code uses Spearman) of ``skimage.feature.hog`` vectors of the absolute-normalised
  maps, with pixels_per_cell 16 x 16 at 224 px scaled to the image size.

Correlations with a constant side are undefined; here they are 1 when both sides are equal
constants and 0 otherwise (a constant map shares no ranking with anything). A map with NaN or
Inf gives NaN: the caller reports such images instead of averaging them in.
"""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("spearman_abs", "spearman_signed", "ssim", "hog")


def _channels_first(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 2:
        return m[None]
    if m.ndim == 3:
        return m
    raise ValueError(f"a saliency map must be [H, W] or [C, H, W], got shape {m.shape}")


def normalize_abs(m: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """[C, H, W] or [H, W] -> [H, W] in [0, 1] (sum |m| over channels, clip at p99)."""
    s = np.abs(_channels_first(m)).sum(axis=0)
    if not np.isfinite(s).all():
        return np.full(s.shape, np.nan)
    lo = float(s.min())
    hi = float(np.percentile(s, percentile))
    if hi <= lo:
        hi = float(s.max())  # a map whose top 1% carries everything: scale by its max
        if hi <= lo:
            return np.zeros(s.shape)
    return np.clip((s - lo) / (hi - lo), 0.0, 1.0)


def normalize_signed(m: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """[C, H, W] or [H, W] -> [H, W] in [-1, 1] (sum over channels / p99 of |sum|)."""
    s = _channels_first(m).sum(axis=0)
    if not np.isfinite(s).all():
        return np.full(s.shape, np.nan)
    span = float(np.percentile(np.abs(s), percentile))
    if span <= 0:
        span = float(np.abs(s).max())
        if span <= 0:
            return np.zeros(s.shape)
    return np.clip(s / span, -1.0, 1.0)


def _correlation(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    from scipy import stats

    x = np.ravel(x)
    y = np.ravel(y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    cx = bool(np.all(x == x[0]))
    cy = bool(np.all(y == y[0]))
    if cx or cy:
        return 1.0 if (cx and cy and x[0] == y[0]) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "spearman":
            r = stats.spearmanr(x, y)[0]
        elif kind == "pearson":
            r = stats.pearsonr(x, y)[0]
        else:
            raise ValueError(f"correlation '{kind}' is not 'pearson' or 'spearman'")
    return float(r)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays of the same size (flattened)."""
    return _correlation(a, b, "spearman")


def spearman_abs(a: np.ndarray, b: np.ndarray) -> float:
    return spearman(normalize_abs(a), normalize_abs(b))


def spearman_signed(a: np.ndarray, b: np.ndarray) -> float:
    return spearman(normalize_signed(a), normalize_signed(b))


def ssim(a01: np.ndarray, b01: np.ndarray) -> float:
    """SSIM of two [H, W] maps already in [0, 1] (gaussian weights, data_range 1)."""
    from skimage.metrics import structural_similarity

    a01 = np.asarray(a01, np.float64)
    b01 = np.asarray(b01, np.float64)
    if not (np.isfinite(a01).all() and np.isfinite(b01).all()):
        return float("nan")
    side = min(a01.shape)
    win = min(11, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"maps of shape {a01.shape} are too small for SSIM (need >= 3 px)")
    return float(structural_similarity(a01, b01, gaussian_weights=True, data_range=1.0,
                                       win_size=win))


def hog_cell(shape: tuple[int, int]) -> tuple[int, int]:
    """pixels_per_cell: 16 x 16 at 224 px, scaled to the map's size (at least 1)."""
    return tuple(max(1, int(round(16 * s / 224))) for s in shape)  # type: ignore[return-value]


def hog_features(a01: np.ndarray) -> np.ndarray:
    from skimage.feature import hog

    a01 = np.asarray(a01, np.float64)
    cell = hog_cell(a01.shape)
    cells = [a01.shape[0] // cell[0], a01.shape[1] // cell[1]]
    block = (max(1, min(3, cells[0])), max(1, min(3, cells[1])))
    return hog(a01, orientations=9, pixels_per_cell=cell, cells_per_block=block,
               feature_vector=True)


def hog_similarity(a01: np.ndarray, b01: np.ndarray, correlation: str = "pearson") -> float:
    """Correlation of the HOG vectors of two [H, W] maps in [0, 1]."""
    a01 = np.asarray(a01, np.float64)
    b01 = np.asarray(b01, np.float64)
    if not (np.isfinite(a01).all() and np.isfinite(b01).all()):
        return float("nan")
    return _correlation(hog_features(a01), hog_features(b01), correlation)


def compare(a: np.ndarray, b: np.ndarray, hog_correlation: str = "pearson") -> dict[str, float]:
    """All four similarities (:data:`METRICS`) of two raw maps ([C, H, W] or [H, W])."""
    a_abs, b_abs = normalize_abs(a), normalize_abs(b)
    return {
        "spearman_abs": spearman(a_abs, b_abs),
        "spearman_signed": spearman(normalize_signed(a), normalize_signed(b)),
        "ssim": ssim(a_abs, b_abs),
        "hog": hog_similarity(a_abs, b_abs, hog_correlation),
    }


__all__ = ["METRICS", "normalize_abs", "normalize_signed", "spearman", "spearman_abs",
           "spearman_signed", "ssim", "hog_cell", "hog_features", "hog_similarity", "compare"]
