"""What every saliency method shares: the result type, the method base class, input checks.

Every method is called the same way::

    maps = METHOD(engine, images, targets=None, **options)   # -> Maps

``images`` are float32 [N, C, H, W] (or one [C, H, W] image) in the engine's raw input space,
values in [0, 1]. ``targets`` are class indices (one int for all images, or one per image);
by default the predicted class argmax_q S_q(x) of each image (docs/definitions.md#score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError, OptionError
from ..numeric import softmax
from . import registry

#: What a method may declare it needs from the engine.
NEEDS = frozenset({"forward", "gradients", "class_gradients", "intermediate_gradients"})


@dataclass
class Maps:
    """The result of one method on a batch of images.

    * ``maps``: float32 [N, H, W], one 2-D map per image, as displayed and ranked (the
      channel reduction is already applied; not normalised, see :mod:`.normalize`);
    * ``targets``: int64 [N], the explained class of each image;
    * ``signed``: True when ``maps`` carries a meaningful sign (use a diverging colour map
      centred at 0), False for magnitudes (sequential colour map);
    * ``raw``: the attribution before the channel reduction when the method has one
      (float32 [N, C, H, W]; Grad-CAM: the coarse map [N, h, w]), else None;
    * ``logits``: float32 [N, classes] of the clean images when the method computed them;
    * ``info``: method-specific extras (e.g. integrated gradients' completeness error).
    """

    method: str
    maps: np.ndarray
    targets: np.ndarray
    signed: bool
    raw: np.ndarray | None = None
    logits: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.maps)


def class_label(c: int, labels) -> str:
    """'c (name)' when ``labels`` names class ``c``, else 'c' (rule texts and figure titles)."""
    return f"{c} ({labels[c]})" if labels and 0 <= c < len(labels) else str(c)


class Method:
    """Base class: a named saliency method with declared needs and default options.

    Subclasses set ``name``, ``needs`` (a subset of :data:`NEEDS`), ``signed``, ``defaults``
    (every option the method accepts, with its default) and implement :meth:`run`. A subclass
    that defines ``name`` registers itself (:mod:`.registry`); one without stays abstract.
    ``rules``: the rule set of the backward pass the method uses (``engine.gradient(...,
    rules=self.rules)``). ``group``: methods of one group that :func:`onnxsal.methods.compute`
    runs with the same options share one call of :meth:`run_group` (e.g. one walk over the
    per-class Jacobian serves both active and inactive).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    signed: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    rules: ClassVar[str] = "default"
    group: ClassVar[str | None] = None
    #: False for a method that cannot run without an option the user must give (ABELE's
    #: autoencoder): ``-m all`` leaves it out; it runs when named
    in_all: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            unknown = set(cls.needs) - NEEDS
            if not cls.needs or unknown:
                raise TypeError(f"method '{cls.name}' must declare needs from {sorted(NEEDS)}, "
                                f"got {sorted(cls.needs)}")
            registry.register(cls)

    def __call__(self, engine, images, targets=None, **options) -> Maps:
        x = as_batch(engine, images)
        opts = self.options(options)
        shared = options.get("_shared")
        t, logits = resolve_targets(engine, x, targets, shared)
        return self.run(engine, x, t, logits, opts, shared if shared is not None else {})

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``given``; unknown options raise OptionError."""
        given = {k: v for k, v in given.items() if not k.startswith("_")}
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise OptionError(f"method '{self.name}' has no option {', '.join(map(repr, unknown))} "
                              f"(its options: {known})")
        opts = dict(self.defaults)
        opts.update(given)
        return opts

    def run(self, engine, x: np.ndarray, targets: np.ndarray, logits: np.ndarray | None,
            opts: dict[str, Any], shared: dict) -> Maps:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def run_group(cls, engine, x: np.ndarray, targets: np.ndarray, names: list[str],
                  opts: dict[str, Any], shared: dict
                  ) -> dict[str, Maps]:  # pragma: no cover - abstract
        """{name: Maps} of the methods ``names`` of this class's ``group``, all with ``opts``
        (only called when ``group`` is set)."""
        raise NotImplementedError

    # -- structured explanations (rule and exemplar methods; docs/extending.md#structured-explanations)

    def explanation(self, maps: Maps, i: int, labels: list[str] | None = None) -> dict[str, Any] | None:
        """A JSON-ready structured explanation of image ``i`` of ``maps`` (what ``onnxsal
        explain`` writes to explanations.json), or None: the default, a map and nothing else.
        ``labels``: class names when known (for rule texts)."""
        return None

    def explanation_arrays(self, maps: Maps, i: int) -> dict[str, np.ndarray]:
        """Arrays of image ``i``'s explanation for maps.npz, keyed by a short name (explain
        stores them as ``<image>/<method>:<name>``); default none."""
        return {}

    def explanation_pictures(self, maps: Maps, i: int, image: np.ndarray,
                             labels: list[str] | None = None) -> list:
        """Pictures (:class:`onnxsal.overlays.Picture`: an image with an outlined region and a
        title) that show image ``i``'s explanation, drawn by explain next to the maps' figure;
        default none."""
        return []

    @classmethod
    def explains(cls) -> bool:
        """Whether this method gives structured explanations (overrides :meth:`explanation`)."""
        return cls.explanation is not Method.explanation

    def __repr__(self) -> str:
        return f"<method {self.name} needs={sorted(self.needs)} signed={self.signed}>"


def as_batch(engine, images) -> np.ndarray:
    """Check and return images as a float32 [N, C, H, W] batch in the engine's input space."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    expected = tuple(engine.input_shape)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise InputError(f"images have shape {tuple(np.shape(images))}; the model takes "
                         f"[N, {', '.join(map(str, expected))}] (float32 in [0, 1], NCHW)")
    if len(x) == 0:
        raise InputError("no images given")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"images must be floating point in [0, 1], got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError("images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    # [0, 1], or [c, 1 + c] for an engine of shifted inputs (Engine(input_shift=c))
    first, last = getattr(engine, "input_range", (0.0, 1.0))
    if lo < first - 1e-4 or hi > last + 1e-4:
        space = "scaled to [0, 1]" if (first, last) == (0.0, 1.0) else \
            f"scaled to [0, 1] and shifted by {first:g} (this engine takes [{first:g}, {last:g}])"
        raise InputError(f"image values span [{lo:.4g}, {hi:.4g}]; onnxsal takes raw pixels "
                         f"{space} (the model's own preprocessing goes in --preprocess)")
    return x


def resolve_targets(engine, x: np.ndarray, targets, shared: dict | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Targets as int64 [N] (default: argmax of the logits) and the logits if computed."""
    n = len(x)
    logits = None
    if shared is not None and "logits" in shared:
        logits = shared["logits"]
    if targets is None:
        if logits is None:
            logits = np.asarray(engine.logits(x), dtype=np.float32)
            if shared is not None:
                shared["logits"] = logits
        return logits.argmax(axis=1).astype(np.int64), logits
    t = np.asarray(targets)
    if t.ndim == 0:
        t = np.full(n, int(t), dtype=np.int64)
    if t.ndim != 1 or len(t) != n or not np.issubdtype(t.dtype, np.integer):
        raise OptionError(f"targets must be one class index or one per image ({n}), "
                          f"got {np.asarray(targets).tolist()!r}")
    t = t.astype(np.int64)
    classes = int(engine.num_classes)
    if (t < 0).any() or (t >= classes).any():
        raise OptionError(f"target class out of range: {t.tolist()} (the model has {classes} "
                          "classes, 0.." f"{classes - 1})")
    return t, logits


def one_hot_seed(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """[1, N, classes] seed selecting each image's target logit."""
    seed = np.zeros((1, len(targets), num_classes), dtype=np.float32)
    seed[0, np.arange(len(targets)), targets] = 1.0
    return seed


def target_scores(logits: np.ndarray, targets: np.ndarray, score: str = "logit") -> np.ndarray:
    """S_target per row: the raw logit (docs/definitions.md#score) or the softmax probability."""
    logits = np.asarray(logits, dtype=np.float64)
    if score == "logit":
        return logits[np.arange(len(targets)), targets]
    if score == "probability":
        return softmax(logits, np.float64)[np.arange(len(targets)), targets]
    raise OptionError(f"score must be 'logit' or 'probability', got {score!r}")
