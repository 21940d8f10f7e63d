"""Binary superpixel features of one image, shared by the rule explainers (anchor, lore).

An image is segmented into S superpixels (:func:`.perturbation.superpixels`, LIME's helper);
a feature vector z in {0, 1}^S says which superpixels are kept (1) and which are replaced
(0) by their fill: the superpixel's own mean colour (``"superpixel_mean"``) or a LIME
baseline (a number, ``"black"``, ``"white"``, ``"mean"`` or an array). :class:`SuperpixelImage`
renders rows of z as images and runs them through ``engine.logits`` in as few calls as the
memory bound allows (~96 MB of built images per call), counting model evaluations and calls.
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError
from .perturbation import _fill, _rows_per_call, superpixels

__all__ = ["SuperpixelImage", "segment_means", "superpixel_fill", "superpixels", "check_segmentation"]


def segment_means(image: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """[C, H, W]: every pixel replaced by its superpixel's mean colour."""
    counts = np.bincount(seg.ravel())
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        means = np.bincount(seg.ravel(), weights=image[c].ravel().astype(np.float64)) / counts
        out[c] = means[seg]
    return out


def superpixel_fill(image: np.ndarray, seg: np.ndarray, fill, method: str = "anchor") -> np.ndarray:
    """What replaces an absent superpixel: its mean colour, or LIME's baseline values."""
    if isinstance(fill, str) and fill == "superpixel_mean":
        return segment_means(image, seg)
    try:
        return _fill(image, fill)
    except OptionError as exc:
        raise OptionError(f"{method} fill: {exc} (or 'superpixel_mean')") from None


def check_segmentation(value, method: str) -> str:
    if value not in ("quickshift", "slic"):
        raise OptionError(f"{method} segmentation must be 'quickshift' or 'slic', got {value!r}")
    return value


class SuperpixelImage:
    """One image [C, H, W], its superpixels [H, W] and fill [C, H, W]; z rows -> model classes."""

    def __init__(self, engine, image: np.ndarray, seg: np.ndarray, fill: np.ndarray):
        self.engine, self.image, self.seg, self.fill = engine, image, seg, fill
        self.k = int(seg.max()) + 1
        self.evaluations = 0
        self.calls = 0

    def render(self, z: np.ndarray) -> np.ndarray:
        """[m, C, H, W]: the images the rows of z [m, S] describe (1 kept, 0 filled)."""
        keep = np.asarray(z, bool)[:, self.seg][:, None]
        return np.where(keep, self.image[None], self.fill[None]).astype(np.float32, copy=False)

    def logits(self, z: np.ndarray) -> np.ndarray:
        """[m, classes]: the model's logits on the rendered rows of z, built and run in
        memory-bounded slices (one ``engine.logits`` call per slice)."""
        z = np.asarray(z, bool).reshape(-1, self.k)
        per = _rows_per_call(self.image[None])
        out = []
        for s in range(0, len(z), per):
            out.append(np.asarray(self.engine.logits(self.render(z[s:s + per])), np.float32))
            self.calls += 1
        self.evaluations += len(z)
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out)

    def predict(self, z: np.ndarray) -> np.ndarray:
        """int64 [m]: the model's top class on the rendered rows of z."""
        if len(z) == 0:
            return np.zeros(0, np.int64)
        return self.logits(z).argmax(axis=1).astype(np.int64)
