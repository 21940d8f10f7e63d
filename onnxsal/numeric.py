"""Small numeric helpers shared by the engine, the methods and the reports."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax as _softmax


def softmax(z: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 by scipy's stable softmax; NaN or
    infinite logits give NaN rows (reported by the caller), without a warning."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _softmax(np.asarray(z, np.float64), axis=-1).astype(dtype)


__all__ = ["softmax"]
