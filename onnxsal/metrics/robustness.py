"""Robustness of saliency maps to small input changes (docs/metrics.md#robustness).

* ``max-sensitivity`` / ``avg-sensitivity`` (Yeh et al. 2019): the largest / mean over
  ``samples`` draws of uniform noise in the L-inf ball of radius ``radius`` of
  ``||Phi(x + delta) - Phi(x)||_F / ||Phi(x)||_F``;
* ``local-lipschitz`` (Alvarez-Melis & Jaakkola 2018): the largest over ``samples`` Gaussian
  neighbours x' (std ``std``) of ``||Phi(x') - Phi(x)||_2 / ||x' - x||_2``, the maps divided by
  their largest absolute value first;
* ``transform-stability``: the map of a slightly rotated, shifted or brightened image, warped
  back into the original frame, against the original map (Spearman and SSIM), over the
  transformations that keep the predicted class.

Phi(x) is ``explain(images, targets) -> maps [N, H, W]`` (the ``explain_class`` option, as
for ``random-logit``), always for the class predicted on the clean image; the stored maps are
Phi(x). All perturbed copies of all images of a batch go to ``explain`` (and, for
``transform-stability``, ``predict_logits``) in one call, split only when they exceed
``max_batch_bytes``; the noise of image i is drawn from a generator seeded with
``(seed, i)``, i the image's index within the evaluated set, so a batch split does not change
the scores. Perturbed pixels are clipped to [0, 1] (the engine's input space).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric

ExplainClass = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _chunks(n: int, per_item: int, budget: int):
    """Slices of ``n`` items of ``per_item`` bytes each under ``budget`` (at least one)."""
    size = max(1, int(budget) // max(1, per_item))
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class _Reexplain(Metric):
    """A metric that re-explains perturbed copies of each image with ``explain``."""

    samples_default = 200

    def __init__(self, explain: ExplainClass | None = None, samples: int | None = None,
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        self.explain = explain
        self.samples = int(self.samples_default if samples is None else samples)
        if self.samples < 1:
            raise OptionError(f"metric '{self.name}': samples must be >= 1, got {self.samples}")
        self.seed = int(seed)
        self.max_batch_bytes = int(max_batch_bytes)
        self._start = 0

    @classmethod
    def _explain_option(cls, options: dict) -> ExplainClass:
        if options.get("explain_class") is None:
            raise OptionError(f"metric '{cls.name}' needs explain_class (a callable "
                              "explain(images, targets) -> maps); onnxsal benchmark has none")
        return options["explain_class"]

    def settings(self) -> dict:
        return {"samples": self.samples, "seed": self.seed}

    def prepare(self, images, maps, labels) -> None:
        super().prepare(images, maps, labels)
        if self.explain is None:
            raise OptionError(f"metric '{self.name}' needs explain=... (explain_class)")
        self._start = 0

    def bytes_per_image(self, shape) -> int:
        return 4 * math.prod(shape) * (self.samples + 1)

    def rng(self, i: int) -> np.random.Generator:
        """The generator of image ``i`` of the evaluated set."""
        return np.random.default_rng([self.seed, self._start + i])

    def explain_all(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``explain`` on a stack of inputs [M, C, H, W], in as few calls as the budget allows."""
        assert self.explain is not None
        out = []
        for sl in _chunks(len(x), 4 * math.prod(x.shape[1:]), self.max_batch_bytes):
            m = np.asarray(self.explain(x[sl], targets[sl]), np.float64)
            if m.shape != (sl.stop - sl.start,) + x.shape[2:]:
                raise InputError(f"explain returned maps of shape {m.shape}; expected "
                                 f"{(sl.stop - sl.start,) + x.shape[2:]}")
            out.append(m)
        return np.concatenate(out)

    def predict_all(self, predict_logits, x: np.ndarray) -> np.ndarray:
        out = [np.asarray(predict_logits(x[sl]))
               for sl in _chunks(len(x), 4 * math.prod(x.shape[1:]), self.max_batch_bytes)]
        return np.concatenate(out)

    def perturb(self, images: np.ndarray) -> np.ndarray:
        """[B, S, C, H, W] perturbed copies (image i's noise from :meth:`rng`)."""
        raise NotImplementedError

    def reexplained(self, predict_logits, images: np.ndarray):
        """(targets [B], perturbed inputs [B, S, C, H, W], their maps [B, S, H, W])."""
        targets = self.predict_all(predict_logits, images).argmax(axis=1)
        xp = self.perturb(images)
        b, s = xp.shape[:2]
        maps = self.explain_all(xp.reshape((b * s,) + images.shape[1:]), np.repeat(targets, s))
        self._start += b
        return targets, xp, maps.reshape((b, s) + images.shape[2:])


class _Sensitivity(_Reexplain):
    """Yeh et al. 2019's sensitivity under uniform noise of L-inf radius ``radius``."""

    direction = "lower"
    reduction = "max"  # over the draws: "max" or "mean"

    def __init__(self, explain: ExplainClass | None = None, samples: int | None = None,
                 radius: float = 0.2, seed: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(explain, samples, seed, max_batch_bytes)
        self.radius = float(radius)
        if not self.radius > 0:
            raise OptionError(f"metric '{self.name}': radius must be > 0, got {radius}")

    @classmethod
    def from_options(cls, options: dict) -> _Sensitivity:
        return cls(cls._explain_option(options), options.get("sensitivity_samples"),
                   options.get("sensitivity_radius", 0.2), options.get("seed", 0),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {**super().settings(), "radius": self.radius}

    def perturb(self, images: np.ndarray) -> np.ndarray:
        s = self.samples
        noise = np.stack([self.rng(i).uniform(-self.radius, self.radius, size=(s,) + x.shape)
                          for i, x in enumerate(images)])
        return np.clip(images[:, None] + noise, 0.0, 1.0).astype(np.float32)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        _, _, mp = self.reexplained(predict_logits, images)
        m = np.asarray(maps, np.float64)
        num = np.linalg.norm((mp - m[:, None]).reshape(len(m), self.samples, -1), axis=2)
        den = np.linalg.norm(m.reshape(len(m), -1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = (num.max(axis=1) if self.reduction == "max" else num.mean(axis=1)) / den
        return {"value": np.where(den > 0, value, np.nan)}


class MaxSensitivity(_Sensitivity):
    """max over noise draws of ||Phi(x+delta) - Phi(x)|| / ||Phi(x)|| (lower: robust)."""

    name = "max-sensitivity"
    reduction = "max"


class AvgSensitivity(_Sensitivity):
    """mean over noise draws of ||Phi(x+delta) - Phi(x)|| / ||Phi(x)|| (lower: robust)."""

    name = "avg-sensitivity"
    reduction = "mean"


__all__ = ["MaxSensitivity", "AvgSensitivity"]
