"""Axiomatic metrics (docs/metrics.md): completeness (Sundararajan et al. 2017) and input
invariance (Kindermans et al. 2019).

Completeness reads the model through ``predict_logits``: S(x) is the logit of each image's
predicted class (the class the methods explain by default) on the image and on the baseline.
The attribution is the stored map ([N, H, W], the per-pixel sum over channels of the raw
attribution), so sum(map) = sum(raw attribution).

Input invariance needs a second explanation, of a model whose first layer compensates a
constant input shift; it cannot come from the stored maps, so the metric takes a callable
``explain_shifted(images + shift, targets) -> maps [N, H, W]`` (the method run on that model,
for each image's predicted class) in its constructor and compares its maps with the stored
maps of ``images``. ``onnxsal evaluate`` builds it from the run's model: an engine with
``input_shift`` (:class:`onnxsal.engine.Engine`), whose preprocessing subtracts the shift.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import InputError, OptionError
from ..methods.base import target_scores
from ..methods.gradient import _baseline
from .base import Metric, PredictLogits

Explain = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _logits(predict_logits: PredictLogits, x: np.ndarray) -> np.ndarray:
    z = np.asarray(predict_logits(x), np.float64)
    if z.ndim != 2 or len(z) != len(x):
        raise InputError(f"the model returned logits of shape {z.shape} for {len(x)} images")
    return z


class Completeness(Metric):
    """|sum(map) - (S(x) - S(x'))| / |S(x) - S(x')| per image (lower: closer to complete)."""

    name = "completeness"
    direction = "lower"

    def __init__(self, baseline="black", max_batch_bytes: int = 256 << 20):
        self.baseline = baseline
        self.max_batch_bytes = int(max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> Completeness:
        return cls(options.get("completeness_baseline", "black"),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        b = self.baseline
        return {"baseline": b if isinstance(b, (str, int, float)) else np.asarray(b).tolist()}

    def bytes_per_image(self, shape) -> int:
        return 2 * 4 * int(np.prod(shape))  # the image and its baseline, in one model call

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        n = len(images)
        z = _logits(predict_logits, np.concatenate([images, _baseline(images, self.baseline)]))
        target = z[:n].argmax(axis=1)
        delta = target_scores(z[:n], target) - target_scores(z[n:], target)
        total = np.asarray(maps, np.float64).reshape(n, -1).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.abs(total - delta) / np.abs(delta)
        value[~np.isfinite(value)] = np.nan  # S(x) = S(x'): undefined; NaN maps or logits
        return {"value": value}


class InputInvariance(Metric):
    """Mean |m(x) - m'(x + c)| / mean |m(x)| per image, m' explaining the shift-compensated
    model (lower: the method is input invariant; 0 is the ideal)."""

    name = "input-invariance"
    direction = "lower"

    def __init__(self, explain_shifted: Explain | None = None, shift: float = 1.0,
                 max_batch_bytes: int = 256 << 20):
        self.explain_shifted = explain_shifted
        self.shift = float(shift)
        self.max_batch_bytes = int(max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> InputInvariance:
        if options.get("explain_shifted") is None:
            raise OptionError("metric 'input-invariance' needs explain_shifted (the method on "
                              "a shift-compensated model), which maps from --maps and onnxsal "
                              "benchmark do not have")
        return cls(options["explain_shifted"], options.get("invariance_shift", 1.0),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"shift": self.shift}

    def prepare(self, images, maps, labels) -> None:
        super().prepare(images, maps, labels)
        if self.explain_shifted is None:
            raise OptionError("metric 'input-invariance' needs explain_shifted=...")

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        assert self.explain_shifted is not None
        m = np.asarray(maps, np.float64)
        targets = _logits(predict_logits, images).argmax(axis=1)  # the class the maps explain
        m2 = np.asarray(self.explain_shifted(images + np.float32(self.shift), targets), np.float64)
        if m2.shape != m.shape:
            raise InputError(f"explain_shifted returned maps of shape {m2.shape}; expected {m.shape}")
        n = len(m)
        scale = np.abs(m).reshape(n, -1).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.abs(m - m2).reshape(n, -1).mean(axis=1) / scale
        value[~np.isfinite(value)] = np.nan
        return {"value": value}
