"""Perturbation methods: forward passes only (docs/definitions.md#method-defaults).

All score the explained class with S_c, the raw logit (docs/definitions.md#score) unless
``score="probability"``, and run every perturbed copy through ``engine.logits`` in large
batches.

* occlusion (Zeiler and Fergus; captum's ``Occlusion``): a window of ``window`` pixels slides
  with ``stride``; each position's score drop S(x) - S(x occluded) is spread over the window's
  pixels and averaged over the windows covering each pixel. Window positions are
  0, s, 2s, ... for ceil((H - k) / s) + 1 steps (the last window may be clipped at the edge).
* RISE (Petsiuk et al. 2018): random binary grids (``grid`` x ``grid``, keep probability
  ``p``) upsampled bilinearly to (grid + 1) x cell size and randomly shifted, as in the
  authors' code; map = sum_i S(x * M_i) M_i / (n p).
* LIME (Ribeiro et al. 2016, image explainer): scikit-image superpixels (SLIC or quickshift),
  random on/off samples (the first sample keeps everything), cosine-distance kernel of width
  0.25, weighted ridge fit (alpha 1, with intercept); map = each superpixel's coefficient.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from skimage.segmentation import quickshift, slic
from skimage.transform import resize

from ..errors import OptionError
from .base import Maps, Method, target_scores

_BATCH_BYTES = 96 * 2**20  # bytes of perturbed images built per engine call


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be an int or a pair of ints, got {v!r}") from None
    if a < 1 or b < 1:
        raise OptionError(f"{what} must be positive, got {v!r}")
    return a, b


def _fill(x: np.ndarray, baseline) -> np.ndarray:
    """The replacement values for one image [C, H, W]: a number, 'black', 'white',
    'mean' (per-channel mean of the image) or an array broadcastable to the image."""
    if isinstance(baseline, str):
        if baseline == "black":
            return np.zeros_like(x)
        if baseline == "white":
            return np.ones_like(x)
        if baseline == "mean":
            return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(np.float32)
        raise OptionError(f"baseline must be 'black', 'white', 'mean', a number or an array, "
                          f"got {baseline!r}")
    try:
        return np.broadcast_to(np.asarray(baseline, np.float32), x.shape).astype(np.float32)
    except ValueError:
        raise OptionError(f"baseline of shape {np.shape(baseline)} does not fit an image of "
                          f"shape {x.shape}") from None


def _rows_per_call(x: np.ndarray) -> int:
    return max(1, _BATCH_BYTES // (int(np.prod(x.shape[1:])) * 4))


# ---------------------------------------------------------------------------------------


class Occlusion(Method):
    name = "occlusion"
    needs = frozenset({"forward"})
    signed = True
    defaults: ClassVar[dict[str, Any]] = {"window": None, "stride": None, "baseline": 0.0,
                                "score": "logit"}
    description = "score drop when a sliding window is replaced by a baseline (Zeiler & Fergus)"

    @staticmethod
    def default_window(h: int, w: int) -> int:
        return max(1, min(h, w) // 8)

    def run(self, engine, x, targets, logits, opts, shared):
        n, c, h, w = x.shape
        kh, kw = _pair(opts["window"] or self.default_window(h, w), "occlusion window")
        sh, sw = _pair(opts["stride"] or (max(1, kh // 2), max(1, kw // 2)), "occlusion stride")
        if kh > h or kw > w:
            raise OptionError(f"occlusion window {kh}x{kw} is larger than the image {h}x{w}")
        ys = np.arange(math.ceil((h - kh) / sh) + 1) * sh
        xs = np.arange(math.ceil((w - kw) / sw) + 1) * sw
        pos = [(y, xx) for y in ys for xx in xs]
        if logits is None:
            logits = np.asarray(engine.logits(x), np.float32)
        clean = target_scores(logits, targets, opts["score"])
        count = np.zeros((h, w), np.float64)
        for y, xx in pos:
            count[y:y + kh, xx:xx + kw] += 1
        per = _rows_per_call(x)
        maps = np.zeros((n, h, w), np.float32)
        for i in range(n):
            fill = _fill(x[i], opts["baseline"])
            total = np.zeros((h, w), np.float64)
            for s in range(0, len(pos), per):
                chunk = pos[s:s + per]
                batch = np.repeat(x[i][None], len(chunk), axis=0)
                for j, (y, xx) in enumerate(chunk):
                    batch[j, :, y:y + kh, xx:xx + kw] = fill[:, y:y + kh, xx:xx + kw]
                sc = target_scores(engine.logits(batch), np.full(len(chunk), targets[i]),
                                   opts["score"])
                for j, (y, xx) in enumerate(chunk):
                    total[y:y + kh, xx:xx + kw] += clean[i] - sc[j]
            maps[i] = total / count
        info = {"window": (kh, kw), "stride": (sh, sw), "positions": len(pos)}
        return Maps(self.name, maps, targets, True, None, logits, info)


# ---------------------------------------------------------------------------------------


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: scikit-image's order-1 resize (mode 'reflect') as a matrix."""
    eye = np.eye(n_in, dtype=np.float64)
    cols = [resize(eye[:, k:k + 1], (n_out, 1), order=1, mode="reflect", anti_aliasing=False,
                   preserve_range=True)[:, 0] for k in range(n_in)]
    return np.stack(cols, axis=1)


class _RiseMaskSource:
    """The random draws of :func:`rise_masks`, upsampled on demand in slices (memory stays
    at one slice of masks, not all of them)."""

    def __init__(self, count: int, size: tuple[int, int], grid: int, p: float, seed):
        self.size = (int(size[0]), int(size[1]))
        h, w = self.size
        rng = np.random.default_rng(seed)
        cell = (math.ceil(h / grid), math.ceil(w / grid))
        up = ((grid + 1) * cell[0], (grid + 1) * cell[1])
        self.grids = (rng.random((count, grid, grid)) < p).astype(np.float64)
        self.shift_y = rng.integers(0, cell[0], count)
        self.shift_x = rng.integers(0, cell[1], count)
        self.ry, self.rx = _interp_matrix(grid, up[0]), _interp_matrix(grid, up[1])

    def __len__(self) -> int:
        return len(self.grids)

    def slice(self, start: int, stop: int) -> np.ndarray:
        h, w = self.size
        out = np.empty((max(0, min(stop, len(self)) - start), h, w), np.float32)
        for j, k in enumerate(range(start, start + len(out))):
            ys = self.ry[self.shift_y[k]:self.shift_y[k] + h]
            xs = self.rx[self.shift_x[k]:self.shift_x[k] + w]
            out[j] = ys @ self.grids[k] @ xs.T
        return out


def rise_masks(count: int, size: tuple[int, int], grid: int = 7, p: float = 0.5,
               seed: int = 0) -> np.ndarray:
    """RISE masks [count, H, W] in [0, 1], as in the authors' generate_masks.

    grid: rng.random((count, grid, grid)) < p; each grid is resized bilinearly (scikit-image,
    order 1, mode reflect) to (grid + 1) * ceil(size / grid) and cropped at a random shift in
    [0, cell) (rng.integers, first rows then columns); rng = numpy.random.default_rng(seed).
    """
    return _RiseMaskSource(count, size, grid, p, seed).slice(0, count)


class RISE(Method):
    name = "rise"
    needs = frozenset({"forward"})
    signed = False
    defaults: ClassVar[dict[str, Any]] = {"masks": 1000, "grid": 7, "p": 0.5, "seed": 0,
                                "baseline": 0.0, "score": "logit"}
    description = "score-weighted sum of random smooth masks (Petsiuk et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        n, c, h, w = x.shape
        count, grid, p = int(opts["masks"]), int(opts["grid"]), float(opts["p"])
        if count < 1 or grid < 1 or not 0 < p <= 1:
            raise OptionError(f"rise needs masks >= 1, grid >= 1 and 0 < p <= 1, got "
                              f"masks={count}, grid={grid}, p={p}")
        source = _RiseMaskSource(count, (h, w), grid, p, opts["seed"])
        fills = [_fill(x[i], opts["baseline"]) for i in range(n)]
        per = _rows_per_call(x)
        maps = np.zeros((n, h, w), np.float64)
        for s in range(0, count, per):
            masks = source.slice(s, s + per)
            m = masks[:, None]
            for i in range(n):
                batch = x[i][None] * m + fills[i][None] * (1 - m)
                sc = target_scores(engine.logits(batch), np.full(len(m), targets[i]),
                                   opts["score"])
                maps[i] += np.tensordot(sc, masks, axes=1)
        maps /= count * p
        info = {"masks": count, "grid": grid, "p": p, "seed": opts["seed"]}
        return Maps(self.name, maps.astype(np.float32), targets, False, None, logits, info)


# ---------------------------------------------------------------------------------------


def superpixels(image: np.ndarray, algorithm: str = "slic", n_segments: int = 50,
                compactness: float | None = None, seed: int = 0) -> np.ndarray:
    """Superpixel labels [H, W] (0..S-1) of one [C, H, W] image in [0, 1].

    slic: ``n_segments``, ``compactness`` (default 10 for colour, Lab space; 0.1 for grey);
    if that yields fewer than n_segments / 4 segments (noisy images), compactness is raised
    tenfold, up to twice. quickshift: LIME's settings at 224 px (kernel_size 4, max_dist 200,
    ratio 0.2), kernel_size and max_dist scaled with min(H, W) / 224.
    """
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float64)
    grey = hwc.shape[2] == 1
    if algorithm == "slic":
        comp = (0.1 if grey else 10.0) if compactness is None else float(compactness)
        for attempt in range(3):
            seg = slic(hwc[:, :, 0] if grey else hwc, n_segments=n_segments,
                       compactness=comp * 10 ** attempt, channel_axis=None if grey else -1,
                       start_label=0)
            if compactness is not None or seg.max() + 1 >= max(2, n_segments // 4):
                break
    elif algorithm == "quickshift":
        rgb = np.repeat(hwc[:, :, :1], 3, axis=2) if hwc.shape[2] != 3 else hwc
        scale = min(hwc.shape[:2]) / 224
        kernel = max(1.0, 4 * scale)
        seg = quickshift(rgb, kernel_size=kernel, max_dist=max(2 * kernel, 200 * scale),
                         ratio=0.2, rng=seed)
    else:
        raise OptionError(f"LIME segmentation must be 'slic' or 'quickshift', got {algorithm!r}")
    _, seg = np.unique(seg, return_inverse=True)
    return seg.reshape(image.shape[1:]).astype(np.int64)


def weighted_ridge(z: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float = 1.0
                   ) -> tuple[np.ndarray, float, float]:
    """Ridge regression with intercept and sample weights (the intercept is not penalised).

    Returns (coefficients, intercept, weighted R^2). Solved with numpy lstsq on the
    augmented system [sqrt(w) Zc; sqrt(alpha) I] b = [sqrt(w) yc; 0].
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    w = np.asarray(weights, np.float64)
    wsum = w.sum()
    zm = (w[:, None] * z).sum(axis=0) / wsum
    ym = float((w * y).sum() / wsum)
    sw = np.sqrt(w)[:, None]
    a = np.vstack([sw * (z - zm), math.sqrt(alpha) * np.eye(z.shape[1])])
    b = np.concatenate([sw[:, 0] * (y - ym), np.zeros(z.shape[1])])
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    intercept = ym - float(zm @ coef)
    pred = z @ coef + intercept
    ss_res = float((w * (y - pred) ** 2).sum())
    ss_tot = float((w * (y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return coef, intercept, r2


class LIME(Method):
    name = "lime"
    needs = frozenset({"forward"})
    signed = True
    defaults: ClassVar[dict[str, Any]] = {"samples": 500, "segmentation": "slic", "segments": 50,
                                "compactness": None, "kernel_width": 0.25, "alpha": 1.0,
                                "seed": 0, "baseline": 0.0, "score": "logit"}
    description = "weighted linear fit of the score on superpixels switched on/off (Ribeiro et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        n, c, h, w = x.shape
        samples = int(opts["samples"])
        if samples < 2:
            raise OptionError(f"lime needs samples >= 2, got {samples}")
        rng = np.random.default_rng(opts["seed"])
        per = _rows_per_call(x)
        maps = np.zeros((n, h, w), np.float32)
        segs = np.zeros((n, h, w), np.int64)
        coefs, intercepts, r2s = [], [], []
        for i in range(n):
            seg = superpixels(x[i], opts["segmentation"], int(opts["segments"]),
                              opts["compactness"], opts["seed"])
            k = int(seg.max()) + 1
            z = rng.integers(0, 2, size=(samples, k)).astype(np.float32)
            z[0] = 1
            fill = _fill(x[i], opts["baseline"])
            scores = np.empty(samples, np.float64)
            for s in range(0, samples, per):
                keep = z[s:s + per][:, seg][:, None]  # [m, 1, H, W]
                batch = x[i][None] * keep + fill[None] * (1 - keep)
                scores[s:s + per] = target_scores(engine.logits(batch),
                                                  np.full(len(keep), targets[i]), opts["score"])
            on = z.sum(axis=1)
            cos = np.where(on > 0, on / (np.sqrt(np.maximum(on, 1)) * math.sqrt(k)), 0.0)
            dist = 1.0 - cos
            kw = float(opts["kernel_width"])
            weights = np.sqrt(np.exp(-(dist ** 2) / kw ** 2))
            coef, icpt, r2 = weighted_ridge(z, scores, weights, float(opts["alpha"]))
            maps[i] = coef[seg]
            segs[i] = seg
            coefs.append(coef.astype(np.float32))
            intercepts.append(icpt)
            r2s.append(r2)
        info = {"segments": segs, "coefficients": coefs, "intercept": np.array(intercepts),
                "r2": np.array(r2s), "samples": samples}
        return Maps(self.name, maps, targets, True, None, logits, info)
