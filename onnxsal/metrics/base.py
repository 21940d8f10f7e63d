"""The shape every metric shares, and the registry the benchmark picks metrics from.

A metric declares its ``name``, its ``direction`` ("lower" or "higher" is better) and the
per-image ``arrays`` it stores per shard as class attributes; :meth:`Metric.__call__` fixes the
pipeline (prepare, batches under a memory budget, evaluate a batch, aggregate); subclasses
fill in the steps. Models are reached only through a ``predict_logits(x) -> logits`` callable
(``Engine.logits`` fits), so a metric never builds a session. A metric becomes
selectable by name (``onnxsal benchmark --add-metric NAME``); defining a subclass with a
``name`` registers it, so a plugin module can add metrics (docs/extending.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import numpy as np

from ..errors import InputError, OptionError

PredictLogits = Callable[[np.ndarray], np.ndarray]


class Metric:
    """Base class: ``result = metric(predict_logits, images, maps, labels=None)``."""

    name: str = "metric"
    direction: Literal["lower", "higher"] = "lower"
    #: the per-image arrays (first axis: images) evaluate_batch returns and a shard stores
    arrays: tuple[str, ...] = ("value",)
    #: the prefix of its arrays' names in a benchmark shard file (None: "<name>:")
    shard_prefix: str | None = None
    #: bytes of model input one batch may hold (the callable batches again internally)
    max_batch_bytes: int = 256 << 20
    #: the index of the first evaluated image within the whole data set: metrics that draw
    #: per-image randomness seed it from (seed, index), so a run split into shards (each
    #: setting its start here) draws what one call over all images draws
    index_offset: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register(cls)

    @classmethod
    def from_options(cls, options: dict) -> Metric:
        """The metric for a benchmark's options (``max_batch_bytes`` and the metric's own
        keys); the default takes only the memory budget."""
        m = cls()
        m.max_batch_bytes = int(options.get("max_batch_bytes", cls.max_batch_bytes))
        return m

    def settings(self) -> dict:
        """The plain values the results depend on (part of the benchmark's shard key)."""
        return {}

    def shard_key(self, array: str) -> str:
        """The name of one of its :attr:`arrays` in a shard file."""
        return (f"{self.name}:" if self.shard_prefix is None else self.shard_prefix) + array

    def check_labels(self, labels: np.ndarray | None, num_classes: int, model: str,
                     source: str) -> None:
        """Refuse the labels of data set ``source`` for ``model`` before any work (default:
        labels are not needed)."""

    def prepare(self, images: np.ndarray, maps: np.ndarray, labels: np.ndarray | None) -> None:
        """Check the inputs once before any batch runs (raise InputError on a mismatch)."""
        check_images_maps(images, maps)

    def bytes_per_image(self, shape: tuple[int, ...]) -> int:
        """Model-input bytes one image of ``shape`` [C, H, W] costs in evaluate_batch."""
        return 4 * math.prod(shape)

    def batches(self, n: int, shape: tuple[int, ...] = (1,)) -> Iterable[slice]:
        """Slices of at most ``max_batch_bytes`` worth of images (at least one image)."""
        return budget_slices(n, self.bytes_per_image(shape), self.max_batch_bytes)

    def evaluate_batch(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                       labels: np.ndarray | None) -> Any:
        """Per-image raw results of one batch."""
        raise NotImplementedError

    def aggregate(self, parts: list) -> Any:
        """Combine the per-batch results into the metric's result. The default: the mean of
        the per-image ``value`` array over the images where it is finite."""
        v = np.concatenate([np.asarray(p["value"], np.float64).reshape(-1) for p in parts])
        ok = np.isfinite(v)
        return {"value": float(v[ok].mean()) if ok.any() else float("nan"),
                "images": len(v), "valid_images": int(ok.sum()), "per_image": v}

    def summarize(self, result: Any, names: list[str]) -> dict:
        """The JSON-ready summary of an aggregated result (``names``: the image names); the
        default, for :meth:`aggregate`'s default: the mean ``value``, the direction and the
        images without a finite value."""
        return {"value": result["value"], "direction": self.direction,
                "images": result["images"], "valid_images": result["valid_images"],
                "failures": [{"name": names[j], "error": "non-finite value"}
                             for j in np.flatnonzero(~np.isfinite(result["per_image"]))]}

    def per_image_scores(self, result: Any) -> dict[str, np.ndarray]:
        """{variant: float [N] per-image score} of an aggregated result, NaN where an image has
        none; the variant "" is the metric itself (a metric with several scores, e.g. one per
        deletion mode, names each). The mean over the finite scores is the aggregate
        ``onnxsal evaluate`` reports. The default, for :meth:`aggregate`'s default: the
        per-image ``value``."""
        return {"": np.asarray(result["per_image"], np.float64)}

    def place(self, entry: dict, summary: dict) -> None:
        """Put the summary into a benchmark result ``entry`` (one model x method)."""
        entry.setdefault("metrics", {})[self.name] = summary

    def clean_score(self, result: Any) -> dict | None:
        """{"score", "images"} of the model on the clean images, when the metric has one."""
        return None

    def evaluate(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                 labels: np.ndarray | None = None) -> dict:
        """The per-image :attr:`arrays` of all images, batch by batch (what a shard stores)."""
        images = np.asarray(images, np.float32)
        maps = np.asarray(maps)
        labels = None if labels is None else np.asarray(labels)
        self.prepare(images, maps, labels)
        parts = [self.evaluate_batch(predict_logits, images[sl], maps[sl],
                                     None if labels is None else labels[sl])
                 for sl in self.batches(len(images), images.shape[1:])]
        if not parts:
            return {}
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in self.arrays}

    def __call__(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                 labels: np.ndarray | None = None) -> Any:
        part = self.evaluate(predict_logits, images, maps, labels)
        return self.aggregate([part] if part else [])


def budget_slices(n: int, per_item: int, budget: int) -> Iterable[slice]:
    """Slices of ``n`` items of ``per_item`` bytes each within ``budget`` bytes (at least one
    item per slice)."""
    size = max(1, int(budget) // max(1, int(per_item)))
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


_REGISTRY: dict[str, type[Metric]] = {}


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type[Metric]) -> None:
    """Make ``cls`` selectable by its ``name`` (done by defining a subclass with a ``name``).

    Defining the same class again (a reloaded module) replaces it; another class taking a
    registered name, or a direction other than 'lower'/'higher', is a programming error."""
    old = _REGISTRY.get(cls.name)
    if old is not None and _origin(old) != _origin(cls):
        raise TypeError(f"metric '{cls.name}' of {_origin(cls)} is already registered by "
                        f"{_origin(old)}")
    if cls.direction not in ("lower", "higher"):
        raise TypeError(f"metric '{cls.name}': direction must be 'lower' or 'higher', "
                        f"got {cls.direction!r}")
    _REGISTRY[cls.name] = cls


def names() -> list[str]:
    """The registered metric names (the built-in ones and those of loaded plugins)."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> type[Metric]:
    """The registered metric class called ``name`` (OptionError naming the choices)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise OptionError(f"unknown metric '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    """Every module of this package (metrics register themselves when defined), then plugins."""
    from .. import metrics, plugins

    plugins.discover(metrics.__name__, metrics.__path__)
    plugins.load()


def check_images_maps(images: np.ndarray, maps: np.ndarray) -> None:
    """images [N, C, H, W] and maps [N, H, W] must agree."""
    if images.ndim != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {images.shape}")
    if maps.ndim != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise InputError(f"saliency maps have shape {maps.shape}; expected "
                         f"[{images.shape[0]}, {images.shape[2]}, {images.shape[3]}] to match "
                         f"the images {images.shape}")
