"""The shape every metric shares: prepare, batch, evaluate a batch, aggregate.

A metric declares its ``name`` and its ``direction`` ("lower" or "higher" is better) as class
attributes. :meth:`Metric.__call__` fixes the pipeline; subclasses fill in the steps. Models
are reached only through a ``predict_logits(x) -> logits`` callable (``Engine.logits`` fits),
so a metric never builds a session.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import numpy as np

from ..errors import InputError

PredictLogits = Callable[[np.ndarray], np.ndarray]


class Metric:
    """Base class: ``result = metric(predict_logits, images, maps, labels=None)``."""

    name: str = "metric"
    direction: Literal["lower", "higher"] = "lower"
    #: images per evaluate_batch call (the callable batches again internally)
    batch_size: int = 64

    def prepare(self, images: np.ndarray, maps: np.ndarray, labels: np.ndarray | None) -> None:
        """Check the inputs once before any batch runs (raise InputError on a mismatch)."""
        check_images_maps(images, maps)

    def batches(self, n: int) -> Iterable[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(n, s + self.batch_size))

    def evaluate_batch(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                       labels: np.ndarray | None) -> Any:
        """Per-image raw results of one batch."""
        raise NotImplementedError

    def aggregate(self, parts: list) -> Any:
        """Combine the per-batch results into the metric's result."""
        raise NotImplementedError

    def __call__(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                 labels: np.ndarray | None = None) -> Any:
        images = np.asarray(images, np.float32)
        maps = np.asarray(maps)
        self.prepare(images, maps, labels)
        parts = []
        for sl in self.batches(len(images)):
            parts.append(self.evaluate_batch(predict_logits, images[sl], maps[sl],
                                             None if labels is None else np.asarray(labels)[sl]))
        return self.aggregate(parts)


def check_images_maps(images: np.ndarray, maps: np.ndarray) -> None:
    """images [N, C, H, W] and maps [N, H, W] must agree."""
    if images.ndim != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {images.shape}")
    if maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise InputError(f"saliency maps have shape {maps.shape}; expected "
                         f"[{images.shape[0]}, {images.shape[2]}, {images.shape[3]}] to match "
                         f"the images {images.shape}")
