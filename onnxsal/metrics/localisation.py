"""Localisation metrics against a ground-truth mask per image (docs/metrics.md): pointing
game, relevance mass accuracy, relevance rank accuracy, attribution localisation and AUC.

How the masks arrive: the metric is constructed with them (``Metric(masks=...)``, bool
[N, H, W] aligned with the images later passed to ``metric(predict_logits, images, maps)``;
:func:`onnxsal.metrics.masks.load_masks` reads them from files), or ``from_options`` takes
them from a ``masks`` option. The pipeline's signature stays (predict_logits, images, maps,
labels): :meth:`evaluate` slices the masks with the same batches as the images. The model is
not used. A map with NaN/Inf, or a mask for which the score is undefined (empty, or for AUC
all-inside), scores NaN. ``onnxsal benchmark`` has no mask option yet, so these metrics are
refused there with one line (the options lack ``masks``).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric, check_images_maps


class _MaskMetric(Metric):
    direction = "higher"

    def __init__(self, masks=None, max_batch_bytes: int = 256 << 20):
        self.masks = None if masks is None else np.asarray(masks, bool)
        self.max_batch_bytes = int(max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> Metric:
        return cls(cls.masks_option(options), options.get("max_batch_bytes", 256 << 20))

    @classmethod
    def masks_option(cls, options: dict) -> np.ndarray:
        """The ``masks`` option (OptionError when there is none)."""
        if options.get("masks") is None:
            raise OptionError(f"metric '{cls.name}' needs ground-truth masks (a 'masks' option, "
                              "bool [N, H, W]); onnxsal benchmark does not take masks yet")
        return np.asarray(options["masks"], bool)

    def prepare(self, images, maps, labels) -> None:
        check_images_maps(images, maps)
        if self.masks is None:
            raise OptionError(f"metric '{self.name}' needs ground-truth masks (masks=...)")
        if self.masks.shape != maps.shape:
            raise InputError(f"masks have shape {self.masks.shape}; expected {maps.shape} to "
                             "match the saliency maps")

    def evaluate(self, predict_logits, images, maps, labels=None) -> dict:
        images = np.asarray(images, np.float32)
        maps = np.asarray(maps)
        self.prepare(images, maps, labels)
        assert self.masks is not None
        vals = [self.score(np.asarray(maps[sl], np.float64), self.masks[sl])
                for sl in self.batches(len(images), images.shape[1:])]
        return {"value": np.concatenate(vals)} if vals else {}

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        """One batch when the masks are those of exactly this batch (evaluate slices them)."""
        if self.masks is None or self.masks.shape != np.shape(maps):
            raise InputError("evaluate_batch needs masks of this batch; use evaluate()")
        return {"value": self.score(np.asarray(maps, np.float64), self.masks)}

    def score(self, maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """float [N] from float64 maps [N, H, W] and bool masks [N, H, W]."""
        out = np.full(len(maps), np.nan)
        for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
            if np.isfinite(m).all() and k.any():
                out[i] = self.one(m, k)
        return out

    def one(self, m: np.ndarray, k: np.ndarray) -> float:
        raise NotImplementedError


class PointingGame(_MaskMetric):
    """1 when a maximal pixel of the map lies in the mask (dilated by ``tolerance`` px), else 0."""

    name = "pointing-game"

    def __init__(self, masks=None, tolerance: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(masks, max_batch_bytes)
        if int(tolerance) != tolerance or tolerance < 0:
            raise OptionError(f"pointing game: tolerance must be a whole number of pixels >= 0, "
                              f"got {tolerance}")
        self.tolerance = int(tolerance)

    @classmethod
    def from_options(cls, options: dict) -> Metric:
        return cls(cls.masks_option(options), options.get("pointing_tolerance", 0),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"tolerance": self.tolerance}

    def one(self, m, k) -> float:
        if self.tolerance:  # the mask dilated: pixels within `tolerance` px (Euclidean) of it
            from scipy.ndimage import distance_transform_edt

            k = distance_transform_edt(~k) <= self.tolerance
        return float(k[m == m.max()].any())


class RelevanceMassAccuracy(_MaskMetric):
    """Positive relevance inside the mask / all positive relevance (Arras et al. 2022)."""

    name = "relevance-mass-accuracy"

    def one(self, m, k) -> float:
        p = np.clip(m, 0, None)
        total = p.sum()
        return float(p[k].sum() / total) if total > 0 else float("nan")


class RelevanceRankAccuracy(_MaskMetric):
    """The fraction of the K = |mask| highest-ranked pixels that lie in the mask (Arras et al.)."""

    name = "relevance-rank-accuracy"

    def one(self, m, k) -> float:
        n_in = int(k.sum())
        top = np.argsort(-m.reshape(-1), kind="stable")[:n_in]
        return float(k.reshape(-1)[top].sum() / n_in)


class AttributionLocalisation(_MaskMetric):
    """Positive relevance inside the mask / all positive relevance, optionally times
    (image area / mask area) (Kohlbrenner et al. 2020's weighted mu_w)."""

    name = "attribution-localisation"

    def __init__(self, masks=None, weighted: bool = False, max_batch_bytes: int = 256 << 20):
        super().__init__(masks, max_batch_bytes)
        self.weighted = bool(weighted)

    @classmethod
    def from_options(cls, options: dict) -> Metric:
        return cls(cls.masks_option(options), options.get("localisation_weighted", False),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"weighted": self.weighted}

    def one(self, m, k) -> float:
        p = np.clip(m, 0, None)
        total = p.sum()
        if total <= 0:
            return float("nan")
        mu = p[k].sum() / total
        return float(mu * k.size / k.sum()) if self.weighted else float(mu)


class LocalisationAUC(_MaskMetric):
    """ROC AUC of the map as a score separating mask pixels from the others."""

    name = "localisation-auc"

    def one(self, m, k) -> float:
        from sklearn.metrics import roc_auc_score

        if k.all():
            return float("nan")  # no outside pixels: AUC undefined
        return float(roc_auc_score(k.reshape(-1), m.reshape(-1)))
