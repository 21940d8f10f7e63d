"""Map-only complexity metrics (docs/metrics.md): sparseness (Gini index of |map|),
complexity (entropy of the |map| distribution) and effective complexity (pixels whose |map|
exceeds a fraction ``eps`` of the map's maximum). They need no model: ``evaluate_batch``
ignores ``predict_logits``. A map that is all zeros, or holds NaN/Inf, scores NaN (undefined;
the default aggregation reports it as a failure rather than averaging it in).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import entropy

from ..errors import OptionError
from .base import Metric


def _abs_flat(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|maps| as float64 [N, H*W], bool [N]: the map is finite and not all zero)."""
    a = np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1)
    ok = np.isfinite(a).all(axis=1) & (a.max(axis=1, initial=0.0) > 0)
    return a, ok


def gini(maps: np.ndarray) -> np.ndarray:
    """Gini index of |map| per image (sorted form, Chalasani et al. 2020): 0 flat, -> 1 sparse."""
    a, ok = _abs_flat(maps)
    a = np.sort(a, axis=1)
    n = a.shape[1]
    i = np.arange(1, n + 1)
    out = np.full(len(a), np.nan)
    out[ok] = ((2 * i - n - 1) * a[ok]).sum(axis=1) / (n * a[ok].sum(axis=1))
    return out


def map_entropy(maps: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of p = |map| / sum |map| per image (Bhatt et al. 2020)."""
    a, ok = _abs_flat(maps)
    out = np.full(len(a), np.nan)
    if ok.any():
        out[ok] = entropy(a[ok], axis=1)  # scipy normalises each row to sum 1
    return out


class Sparseness(Metric):
    """Gini index of |map| (higher: the saliency sits on fewer pixels)."""

    name = "sparseness"
    direction = "higher"

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        return {"value": gini(maps)}


class Complexity(Metric):
    """Entropy of the normalised |map| (lower: a less complex explanation)."""

    name = "complexity"
    direction = "lower"

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        return {"value": map_entropy(maps)}


class EffectiveComplexity(Metric):
    """The number of pixels with |map| > eps * max |map| (lower: fewer pixels matter).

    The threshold is relative to each map's maximum (Nguyen & Martinez normalise the
    attribution first), so that maps of different scales compare; ``eps`` defaults to 1e-5."""

    name = "effective-complexity"
    direction = "lower"

    def __init__(self, eps: float = 1e-5, max_batch_bytes: int = 256 << 20):
        if not 0.0 <= float(eps) < 1.0:
            raise OptionError(f"effective complexity: eps must lie in [0, 1), got {eps}")
        self.eps = float(eps)
        self.max_batch_bytes = int(max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> EffectiveComplexity:
        return cls(options.get("effective_complexity_eps", 1e-5),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"eps": self.eps}

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        a, ok = _abs_flat(maps)
        out = np.full(len(a), np.nan)
        if ok.any():
            rel = a[ok] / a[ok].max(axis=1, keepdims=True)
            out[ok] = (rel > self.eps).sum(axis=1)
        return {"value": out}
