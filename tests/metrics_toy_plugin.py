"""An evaluation metric defined outside the package, as a plugin would define it (used by
tests/test_metrics_registry.py through ``onnxsal --plugin``; not collected by pytest).

``toy-gini``: the Gini index of each map's absolute values (Chalasani et al. 2020 use it as
a sparseness score: 0 for a flat map, close to 1 when a few pixels hold all the saliency).
It declares only its name, direction and per-image array; the base pipeline batches, the
default aggregation takes the mean over the images.
"""

from __future__ import annotations

import numpy as np

from onnxsal.metrics.base import Metric

#: the number of images of every evaluate_batch call, so that a test can see the batching
BATCH_SIZES: list[int] = []


class ToyGini(Metric):
    name = "toy-gini"
    direction = "higher"
    arrays = ("value",)

    def evaluate_batch(self, predict_logits, images, maps, labels):
        BATCH_SIZES.append(len(images))
        a = np.sort(np.abs(np.asarray(maps, np.float64)).reshape(len(maps), -1), axis=1)
        n = a.shape[1]
        i = np.arange(1, n + 1)
        total = a.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            g = ((2 * i - n - 1) * a).sum(axis=1) / (n * total)
        return {"value": g}
