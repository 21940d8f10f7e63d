"""Deletion and insertion (RISE, Petsiuk et al. 2018; docs/definitions.md#rise-metrics).

Score: the softmax probability of the class predicted on the clean image. Pixels are taken
in descending saliency order (ties in pixel order: a stable sort), ``step`` pixels per
iteration, giving ceil(H*W/step) + 1 points from 0 to all pixels. Deletion replaces them with
a baseline (black, white, the image's per-channel mean, or its blurred copy); insertion starts
from the blurred image and puts the original pixels back. The blur is Gaussian, sigma 5 with
an 11-pixel kernel at 224 px, scaled with the image size but never below sigma 1 (at 28 px the
scaled kernel would be the identity) (``skimage.filters.gaussian``, ``mode='nearest'``).
AUC: trapezoid over x in [0, 1]; lower is better for deletion, higher for insertion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from ..numeric import softmax
from .base import Metric, PredictLogits

BASELINES = ("black", "white", "mean", "blur")
MIN_SIGMA = 1.0  # px: the scaled blur of small images (e.g. 28 px: sigma 0.625) is floored here


def blur(images: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Gaussian blur of [N, C, H, W] images: sigma 5 and kernel 11 at 224 px, scaled."""
    from skimage.filters import gaussian

    images = np.asarray(images, np.float32)
    n, c, h, w = images.shape
    if sigma is None:  # scaled with the image, but at least 1 px (below ~45 px it would vanish)
        sig = (max(5.0 * h / 224.0, MIN_SIGMA), max(5.0 * w / 224.0, MIN_SIGMA))
    else:
        sig = (float(sigma),) * 2
    out = np.empty_like(images)
    for i in range(n):
        # truncate=1 sigma: radius round(5 * 1) = 5 at 224 px, i.e. an 11-pixel kernel
        out[i] = gaussian(images[i], sigma=(0.0,) + sig, truncate=1.0, mode="nearest",
                          preserve_range=True)
    return out


def baseline_images(x: np.ndarray, kind: str, sigma: float | None = None) -> np.ndarray:
    """[N, C, H, W] replacement values: black (0), white (1), the per-channel mean, or blur."""
    if kind == "black":
        return np.zeros_like(x)
    if kind == "white":
        return np.ones_like(x)
    if kind == "mean":
        return np.broadcast_to(x.mean(axis=(2, 3), keepdims=True), x.shape).copy()
    if kind == "blur":
        return blur(x, sigma)
    raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{kind}'")


def pixel_order(maps: np.ndarray) -> np.ndarray:
    """int [N, H*W]: rank of every pixel in descending saliency (0 = most salient)."""
    n = maps.shape[0]
    flat = np.asarray(maps, np.float64).reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(flat.shape[1])[None].repeat(n, 0), axis=1)
    return rank


@dataclass
class RiseResult:
    name: str
    x: np.ndarray          # [T] in [0, 1]
    scores: np.ndarray     # [N, T] class probability at each point
    targets: np.ndarray    # [N] the clean prediction
    auc_per_image: np.ndarray  # [N] (NaN for failed images)
    errors: list[str]      # one per image, '' when fine

    @property
    def valid(self) -> np.ndarray:
        return np.array([not e for e in self.errors], bool)

    @property
    def curve(self) -> np.ndarray:
        """Mean score over the valid images at each point."""
        ok = self.valid
        return self.scores[ok].mean(axis=0) if ok.any() else np.full(self.scores.shape[1], np.nan)

    @property
    def auc(self) -> float:
        ok = self.valid
        return float(self.auc_per_image[ok].mean()) if ok.any() else float("nan")

    def to_dict(self) -> dict:
        return {"metric": self.name, "x": self.x.tolist(), "curve": self.curve.tolist(),
                "auc": self.auc, "valid_images": int(self.valid.sum()),
                "auc_per_image": self.auc_per_image.tolist()}


class _RiseMetric(Metric):
    insertion = False
    arrays = ("scores", "targets", "errors")

    def __init__(self, step: int | None = None, baseline: str = "black",
                 sigma: float | None = None, max_batch_bytes: int = 256 << 20):
        if step is not None and (not isinstance(step, (int, np.integer)) or step < 1):
            raise OptionError(f"step must be a positive integer, got {step!r}")
        if baseline not in BASELINES:
            raise OptionError(f"baseline must be one of {', '.join(BASELINES)}, got '{baseline}'")
        self.step = step
        self.baseline = baseline
        self.sigma = sigma
        self.max_batch_bytes = int(max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> _RiseMetric:
        return cls(options.get("rise_step"), options.get("rise_baseline", "black"),
                   max_batch_bytes=options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"step": self.step, "baseline": self.baseline, "sigma": self.sigma}

    def bytes_per_image(self, shape) -> int:
        """Every point of the image's curve (one model input each)."""
        c, h, w = shape
        return len(self.points(h, w)[1]) * 4 * c * h * w

    def points(self, h: int, w: int) -> tuple[int, np.ndarray]:
        """(step, pixel counts [T]) with T = ceil(H*W/step) + 1; the last count is H*W."""
        step = self.step or w  # default: one image row's worth of pixels per iteration
        n_steps = math.ceil(h * w / step)
        counts = np.minimum(np.arange(n_steps + 1) * step, h * w)
        return step, counts

    def _start_and_finish(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image at count 0, image that fills the taken pixels)."""
        if self.insertion:
            return blur(x, self.sigma), x
        return x, baseline_images(x, self.baseline, self.sigma)

    def evaluate_batch(self, predict_logits: PredictLogits, images, maps, labels=None) -> dict:
        """Scores [N, T] (NaN rows for images whose map or logits are not finite)."""
        images = np.asarray(images, np.float32)
        maps = np.asarray(maps)
        n, c, h, w = images.shape
        _, counts = self.points(h, w)
        T = len(counts)
        targets = np.asarray(predict_logits(images)).argmax(axis=1)
        start, fill = self._start_and_finish(images)
        rank = pixel_order(np.nan_to_num(maps, nan=-np.inf)).reshape(n, h, w)
        scores = np.full((n, T), np.nan, np.float64)
        per_variant = c * h * w * 4
        if n * T * per_variant <= self.max_batch_bytes:  # the batch's curves in one model call
            taken = rank[:, None] < counts[None, :, None, None]  # [n, T, H, W]
            var = np.where(taken[:, :, None], fill[:, None], start[:, None])
            prob = softmax(np.asarray(predict_logits(var.reshape(n * T, c, h, w))), np.float64)
            scores[:] = prob.reshape(n, T, -1)[np.arange(n), :, targets]
        else:  # one curve in several calls
            chunk = max(1, int(self.max_batch_bytes // per_variant))
            for i in range(n):
                for s in range(0, T, chunk):
                    cnt = counts[s:s + chunk]
                    taken = rank[i][None] < cnt[:, None, None]  # [t, H, W]
                    var = np.where(taken[:, None], fill[i][None], start[i][None])
                    prob = softmax(np.asarray(predict_logits(var)), np.float64)
                    scores[i, s:s + len(cnt)] = prob[:, targets[i]]
        bad = ~np.isfinite(maps.reshape(n, -1)).all(axis=1)
        scores[bad] = np.nan
        errors = np.array(["saliency map contains NaN or Inf" if b else "" for b in bad], dtype=str)
        nf = ~np.isfinite(scores).all(axis=1) & ~bad
        errors[nf] = "non-finite logits"
        scores[nf] = np.nan
        return {"scores": scores, "targets": targets, "errors": errors}

    def aggregate(self, parts: list[dict]) -> RiseResult:
        scores = np.concatenate([p["scores"] for p in parts])
        targets = np.concatenate([p["targets"] for p in parts])
        errors = [str(e) for p in parts for e in np.asarray(p["errors"]).tolist()]
        x = np.linspace(0.0, 1.0, scores.shape[1])
        aucs = np.trapezoid(scores, x=x, axis=1)
        return RiseResult(self.name, x, scores, targets, aucs, errors)

    def summarize(self, result: RiseResult, names: list[str]) -> dict:
        return {"x": result.x.tolist(), "curve": result.curve.tolist(), "auc": result.auc,
                "valid_images": int(result.valid.sum()), "direction": self.direction,
                "failures": [{"name": names[j], "error": e}
                             for j, e in enumerate(result.errors) if e]}

    def per_image_scores(self, result: RiseResult) -> dict[str, np.ndarray]:
        """Each image's AUC (NaN for failed images)."""
        return {"": np.where(result.valid, result.auc_per_image, np.nan)}

    def place(self, entry: dict, summary: dict) -> None:
        """Under ``entry["rise"]["deletion" | "insertion"]``."""
        entry.setdefault("rise", {})[self.name] = summary


class RiseDeletion(_RiseMetric):
    """Remove the most salient pixels first: the probability should fall fast (lower AUC)."""

    name = "deletion"
    direction = "lower"
    shard_prefix = "rise_deletion_"
    insertion = False


class RiseInsertion(_RiseMetric):
    """Put the most salient pixels back into a blurred image first (higher AUC is better)."""

    name = "insertion"
    direction = "higher"
    shard_prefix = "rise_insertion_"
    insertion = True
