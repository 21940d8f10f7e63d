"""Normalisation of saliency maps for display and ranking (docs/definitions.md#normalisation)."""

from __future__ import annotations

import numpy as np


def minmax(maps: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling over H x W to [0, 1].

    ``maps``: [H, W] or [N, H, W]. A constant map (all zeros, for example) becomes all zeros,
    never NaN (the reference code divides by zero there).
    """
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim not in (2, 3):
        raise ValueError(f"minmax expects [H, W] or [N, H, W] maps, got shape {m.shape}")
    single = m.ndim == 2
    if single:
        m = m[None]
    lo = m.min(axis=(1, 2), keepdims=True)
    span = m.max(axis=(1, 2), keepdims=True) - lo
    safe = np.where(span > 0, span, np.float32(1.0))
    out = np.where(span > 0, (m - lo) / safe, np.float32(0.0)).astype(np.float32)
    return out[0] if single else out


def maxabs(maps: np.ndarray) -> np.ndarray:
    """Per-image scaling of a signed map by its largest absolute value, to [-1, 1].

    Keeps zero at zero (for diverging colour maps). A map of zeros stays zeros.
    """
    m = np.asarray(maps, dtype=np.float32)
    single = m.ndim == 2
    if single:
        m = m[None]
    scale = np.abs(m).max(axis=(1, 2), keepdims=True)
    out = np.where(scale > 0, m / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
    return out[0] if single else out
