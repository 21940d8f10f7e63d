"""The smooth and efficient model-parameter randomisation tests (Hedström et al. 2024, "A Fresh
Look at Sanity Checks for Saliency Maps"; docs/metrics.md#randomisation), as Quantus 0.6.0
implements them (``SmoothMPRT``, ``EfficientMPRT``).

Both compare the method's explanations on the trained model with those on the fully
randomised model: every layer :func:`onnxsal.metrics.sanity.find_layers` finds, re-drawn by
:func:`onnxsal.metrics.randomisation.randomize` (seed ``seed``), i.e. the last step of the
cascading test, whatever the order (Quantus's default order, bottom-up, ends there too).

* ``smooth-mprt``: Spearman rank correlation of |smoothed map| of the trained and of the
  randomised model; a smoothed map is the mean of the maps of ``samples`` copies of the image,
  all but the last with Gaussian noise of std ``noise`` x (max - min of the image), the last
  one clean. Lower is better.
* ``efficient-mprt``: the relative rise of the maps' discrete entropy (histogram of ``bins``
  equal bins of the map's values), ``(H(e_random) - H(e_trained)) / H(e_trained)``. Higher is
  better.

Options (the benchmark's / evaluate's ``options`` dict):

* ``model``: the trained model, an ``onnx.ModelProto`` (or a path);
* ``explain_model``: a callable ``explain_model(model_proto, images [N, C, H, W], targets [N])
  -> maps [N, H, W]``: the method run on that model (:func:`model_explainer` builds one from a
  method name). The metric passes one ``ModelProto`` object per model for all its batches;
* ``seed`` (0): the randomisation seed and the seed of the noise (image i's noise comes from a
  generator seeded with ``(seed, i)``, i its index in the evaluated set);
* ``smprt_samples`` (50), ``smprt_noise`` (0.1); ``emprt_bins`` (100).

The explained class is the one ``predict_logits`` (the trained model) predicts on the clean
image, for both models. The stored maps are only checked for their shape: both sides are
recomputed, as Quantus does when it is not given ``a_batch``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np
import onnx
from scipy import stats

from ..errors import InputError, OptionError
from ..model import load_model
from .base import Metric, budget_slices
from .randomisation import randomize
from .sanity import find_layers
from .similarity import spearman

ExplainModel = Callable[[onnx.ModelProto, np.ndarray, np.ndarray], np.ndarray]


def model_explainer(method: str, method_options: dict | None = None, **engine_options: Any) -> ExplainModel:
    """``explain_model`` for an onnxsal method: an :class:`~onnxsal.engine.Engine` per model
    (kept while the model object lives in the metric), ``engine_options`` passed to it,
    ``method_options`` (e.g. the seed) to the method."""
    from .. import methods
    from ..engine import Engine

    engines: dict[int, tuple[onnx.ModelProto, Any]] = {}

    def explain(model: onnx.ModelProto, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        key = id(model)
        if key not in engines or engines[key][0] is not model:
            engines[key] = (model, Engine(model, **engine_options))
        engine = engines[key][1]
        return methods.compute(engine, images, [method], targets=np.asarray(targets),
                               **({method: method_options} if method_options else {}))[method].maps

    return explain


class _ModelRandomisation(Metric):
    """Explanations of the trained and of the fully randomised model."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike | None = None,
                 explain_model: ExplainModel | None = None, seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        # a path is read like any model file: external data only inside its folder, size limits
        self.model = load_model(model) if isinstance(model, (str, os.PathLike)) else model
        self.explain_model = explain_model
        self.seed = int(seed)
        if self.seed < 0:
            raise OptionError(f"metric '{self.name}': seed must be >= 0, got {seed}")
        self.max_batch_bytes = int(max_batch_bytes)
        self._random: onnx.ModelProto | None = None
        self._start = 0

    @classmethod
    def _model_options(cls, options: dict) -> tuple:
        missing = [k for k in ("model", "explain_model") if options.get(k) is None]
        if missing:
            raise OptionError(f"metric '{cls.name}' needs the options {' and '.join(missing)} (the "
                              "trained ModelProto and explain_model(model, images, targets) -> maps)")
        return options["model"], options["explain_model"], options.get("seed", 0)

    def settings(self) -> dict:
        return {"seed": self.seed}

    def copies(self) -> int:
        """Model inputs per image and model."""
        return 1

    def bytes_per_image(self, shape) -> int:
        return 4 * math.prod(shape) * self.copies()

    def prepare(self, images, maps, labels) -> None:
        super().prepare(images, maps, labels)
        if self.model is None or self.explain_model is None:
            raise OptionError(f"metric '{self.name}' needs model=... and explain_model=...")
        if self._random is None:
            layers = find_layers(self.model)
            if not layers:
                raise InputError(f"metric '{self.name}': the model has no learnable layer to randomise")
            self._random = randomize(self.model, layers, seed=self.seed)
        self._start = int(self.index_offset)

    def explain_both(self, x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps of x [M, C, H, W] on the trained and on the randomised model."""
        assert self.model is not None and self.explain_model is not None and self._random is not None
        out = []
        for model in (self.model, self._random):
            parts = []
            for sl in budget_slices(len(x), 4 * math.prod(x.shape[1:]), self.max_batch_bytes):
                m = np.asarray(self.explain_model(model, x[sl], targets[sl]), np.float64)
                if m.shape != (len(x[sl]),) + x.shape[2:]:
                    raise InputError(f"explain_model returned maps of shape {m.shape}; expected "
                                     f"{(len(x[sl]),) + x.shape[2:]}")
                parts.append(m)
            out.append(np.concatenate(parts))
        return out[0], out[1]


class SmoothMPRT(_ModelRandomisation):
    """Spearman(|smoothed map| trained, |smoothed map| randomised) (lower: model-sensitive)."""

    name = "smooth-mprt"
    direction = "lower"

    def __init__(self, model=None, explain_model: ExplainModel | None = None, samples: int = 50,
                 noise: float = 0.1, seed: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(model, explain_model, seed, max_batch_bytes)
        self.samples = int(samples)
        self.noise = float(noise)
        if self.samples < 1 or self.noise < 0:
            raise OptionError(f"metric 'smooth-mprt': samples must be >= 1 and noise >= 0, got "
                              f"{samples}, {noise}")

    @classmethod
    def from_options(cls, options: dict) -> SmoothMPRT:
        model, explain, seed = cls._model_options(options)
        return cls(model, explain, options.get("smprt_samples", 50), options.get("smprt_noise", 0.1),
                   seed, options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {**super().settings(), "samples": self.samples, "noise": self.noise}

    def copies(self) -> int:
        return self.samples

    def noisy(self, images: np.ndarray) -> np.ndarray:
        """[B, S, C, H, W]: S - 1 noisy copies and the clean image last (Quantus's order)."""
        out = np.repeat(images[:, None].astype(np.float64), self.samples, axis=1)
        for i, x in enumerate(images):
            std = self.noise * float(x.max() - x.min())
            rng = np.random.default_rng([self.seed, self._start + i])
            out[i, :-1] += rng.standard_normal((self.samples - 1,) + x.shape) * std
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        b, s = len(images), self.samples
        targets = np.asarray(predict_logits(images)).argmax(axis=1)
        xs = self.noisy(images).reshape((b * s,) + images.shape[1:])
        self._start += b
        trained, randomised = self.explain_both(xs, np.repeat(targets, s))
        hw = images.shape[2:]
        a = np.abs(trained.reshape((b, s) + hw).mean(axis=1))
        r = np.abs(randomised.reshape((b, s) + hw).mean(axis=1))
        return {"value": np.array([spearman(p, q) for p, q in zip(a, r, strict=True)])}


def discrete_entropy(m: np.ndarray, bins: int = 100) -> float:
    """Entropy (nats) of the histogram of the map's values in ``bins`` equal bins."""
    m = np.asarray(m, np.float64).ravel()
    if not np.isfinite(m).all():
        return float("nan")
    hist, _ = np.histogram(m, bins=bins)
    return float(stats.entropy(hist))


class EfficientMPRT(_ModelRandomisation):
    """(H(map randomised) - H(map trained)) / H(map trained) (higher: model-sensitive)."""

    name = "efficient-mprt"
    direction = "higher"
    arrays = ("value", "entropy_trained", "entropy_random")

    def __init__(self, model=None, explain_model: ExplainModel | None = None, bins: int = 100,
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(model, explain_model, seed, max_batch_bytes)
        self.bins = int(bins)
        if self.bins < 2:
            raise OptionError(f"metric 'efficient-mprt': bins must be >= 2, got {bins}")

    @classmethod
    def from_options(cls, options: dict) -> EfficientMPRT:
        model, explain, seed = cls._model_options(options)
        return cls(model, explain, options.get("emprt_bins", 100), seed,
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {**super().settings(), "bins": self.bins}

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        targets = np.asarray(predict_logits(images)).argmax(axis=1)
        trained, randomised = self.explain_both(np.asarray(images, np.float32), targets)
        h0 = np.array([discrete_entropy(m, self.bins) for m in trained])
        h1 = np.array([discrete_entropy(m, self.bins) for m in randomised])
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.where(h0 > 0, (h1 - h0) / h0, np.nan)
        return {"value": value, "entropy_trained": h0, "entropy_random": h1}


__all__ = ["SmoothMPRT", "EfficientMPRT", "discrete_entropy", "model_explainer"]
