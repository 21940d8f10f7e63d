"""The random-logit test (Sixt et al. 2020; docs/metrics.md): SSIM between the stored map of
each image's predicted class and the map of a random other class.

The second map cannot come from the stored maps, so the metric takes a callable
``explain(images, targets) -> maps [N, H, W]`` (e.g. ``lambda x, t: methods.compute(engine,
x, [name], targets=t)[name].maps``). The other class is drawn per image from a generator
seeded with ``seed`` and the image's index within the evaluated set, uniformly among the
classes other than the predicted one, so a batch split does not change it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric
from .similarity import normalize_abs, ssim

ExplainClass = Callable[[np.ndarray, np.ndarray], np.ndarray]


class RandomLogit(Metric):
    """SSIM(map of the predicted class, map of a random other class) (lower: class-sensitive)."""

    name = "random-logit"
    direction = "lower"
    arrays = ("value", "other")

    def __init__(self, explain: ExplainClass | None = None, seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        self.explain = explain
        self.seed = int(seed)
        self.max_batch_bytes = int(max_batch_bytes)
        self._start = 0

    @classmethod
    def from_options(cls, options: dict) -> RandomLogit:
        if options.get("explain_class") is None:
            raise OptionError("metric 'random-logit' needs explain_class (a callable "
                              "explain(images, targets) -> maps); onnxsal benchmark has none")
        return cls(options["explain_class"], options.get("seed", 0),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"seed": self.seed}

    def prepare(self, images, maps, labels) -> None:
        super().prepare(images, maps, labels)
        if self.explain is None:
            raise OptionError("metric 'random-logit' needs explain=...")
        self._start = int(self.index_offset)

    def other_classes(self, predicted: np.ndarray, num_classes: int, start: int) -> np.ndarray:
        """A uniform class != predicted per image, from (seed, image index)."""
        if num_classes < 2:
            raise InputError("the random-logit test needs a model with at least 2 classes")
        draw = np.array([np.random.default_rng([self.seed, start + i]).integers(num_classes - 1)
                         for i in range(len(predicted))], np.int64)
        return draw + (draw >= predicted)  # skip the predicted class

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        assert self.explain is not None
        z = np.asarray(predict_logits(images))
        predicted = z.argmax(axis=1)
        other = self.other_classes(predicted, z.shape[1], self._start)
        self._start += len(images)
        m2 = np.asarray(self.explain(images, other))
        if m2.shape != np.shape(maps):
            raise InputError(f"explain returned maps of shape {m2.shape}; expected {np.shape(maps)}")
        value = np.array([ssim(normalize_abs(a), normalize_abs(b)) for a, b in zip(maps, m2, strict=True)])
        return {"value": value, "other": other}
