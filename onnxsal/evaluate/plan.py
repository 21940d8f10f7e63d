"""Which metrics apply to a run of ``onnxsal evaluate`` and with which options
(:func:`plan_metrics`, the one-line reason of each skipped metric), the metric names
(:func:`resolve_metric_names`), and the explainers the metrics call to re-explain images
(:class:`_Explainer`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..benchmark import _as_maps
from ..data import Dataset
from ..errors import OptionError
from ..metrics import base as metrics
from .maps import _digest

# --------------------------------------------------------------------------------------------
# which metrics apply, and their options


class _ProbeExplainer:
    """Stands in for :class:`_Explainer` while the metrics are chosen; never called."""

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("a probe explainer is never called")

    def for_model(self, model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("a probe explainer is never called")

    def shifted(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("a probe explainer is never called")


_dummy_explain = _ProbeExplainer()


def _with_inputs(base: dict, masks: np.ndarray | None, explain: Callable | None,
                 engine: Any) -> dict:
    """The metric options for one (slice, method): the plain ones, the masks of the slice,
    ``explain_class(images, targets) -> maps`` re-explaining with the method,
    ``explain_model(model, images, targets) -> maps`` explaining a re-weighted copy of the model
    with it (the MPRT metrics), ``explain_shifted(images + c, targets) -> maps`` on the model
    that takes shifted inputs (input invariance), and the model
    (``engine``: the engine that runs it, ``model``: its ONNX ModelProto)."""
    opts = dict(base)
    if masks is not None:
        opts["masks"] = masks
    if explain is not None:
        opts["explain_class"] = explain
        opts["explain_model"] = explain.for_model
        opts["explain_shifted"] = explain.shifted
    if engine is not None:
        opts["engine"] = engine
        opts["model"] = getattr(engine, "source_model", None)
    return opts


@dataclass
class _MetricPlan:
    name: str
    obj: metrics.Metric      # built in the driver: settings, aggregate, summarize
    uses_masks: bool
    key: str                 # what its parts depend on beyond the run key


def _skip_reason(cls, base: dict, n: int, hw: tuple[int, int], has_masks: bool,
                 can_explain: bool, engine: Any, exc: OptionError) -> str:
    """Why ``cls`` cannot be built from what this run has (one line)."""
    dummy_masks = np.zeros((n, *hw), bool)
    if not has_masks:
        try:
            cls.from_options(_with_inputs(base, dummy_masks,
                                          _dummy_explain if can_explain else None, engine))
            return "needs ground-truth masks (--masks)"
        except OptionError:
            pass
    if not can_explain:
        try:
            cls.from_options(_with_inputs(base, dummy_masks, _dummy_explain, engine))
            return ("needs to re-explain images with the method, which maps from --maps "
                    "cannot do")
        except OptionError:
            pass
    return " ".join(str(exc).split())


def plan_metrics(names: Sequence[str], base: dict, ds: Dataset, engine: Any,
                 masks: np.ndarray | None, can_explain: bool
                 ) -> tuple[list[_MetricPlan], list[dict]]:
    """(the metrics that apply, [{"metric", "reason"}] of those skipped)."""
    n, hw = len(ds), tuple(ds.shape[1:])
    probe_explain = _dummy_explain if can_explain else None
    plans, skipped = [], []
    masks_hash = None if masks is None else _digest(np.packbits(masks))
    for name in names:
        cls = metrics.get(name)
        try:
            obj = cls.from_options(_with_inputs(base, masks, probe_explain, engine))
        except OptionError as exc:
            skipped.append({"metric": name, "reason": _skip_reason(
                cls, base, n, hw, masks is not None, can_explain, engine, exc)})
            continue
        try:
            obj.check_labels(ds.labels, int(engine.num_classes), "the model", ds.source)
        except OptionError as exc:  # e.g. accuracy without labels (InputError: a real error)
            skipped.append({"metric": name, "reason": " ".join(str(exc).split())})
            continue
        uses_masks = False
        if masks is not None:
            try:
                cls.from_options(_with_inputs(base, None, probe_explain, engine))
            except OptionError:
                uses_masks = True
        key_src = json.dumps({"metric": name, "settings": obj.settings(),
                              "masks": masks_hash if uses_masks else None,
                              "options": {k: base[k] for k in sorted(base)}},
                             sort_keys=True, default=str)
        plans.append(_MetricPlan(name, obj, uses_masks,
                                 hashlib.sha256(key_src.encode()).hexdigest()[:12]))
    return plans, skipped


def resolve_metric_names(metric_names: Sequence[str] | str) -> list[str]:
    """Registered names from names, comma lists and 'all' (every registered metric)."""
    if isinstance(metric_names, str):
        metric_names = [metric_names]
    out: list[str] = []
    for spec in metric_names:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            for name in (metrics.names() if part.lower() == "all" else [metrics.get(part).name]):
                if name not in out:
                    out.append(name)
    if not out:
        raise OptionError("no metrics given (e.g. --metrics sparseness,region-perturbation-morf, "
                          "or all)")
    return out


class _Explainer:
    """``explain(images [N, C, H, W], targets [N]) -> maps [N, H, W]`` with ``method`` on the
    run's engine, and :meth:`for_model`: the same on another ONNX model of the same inputs (a
    randomised copy of the model: the engine built for it keeps this engine's preprocessing,
    providers and threads)."""

    def __init__(self, engine: Any, method: str, seed: int, shift: float = 1.0):
        from .. import methods

        self.engine, self.method, self.shift = engine, method, float(shift)
        self.opts = {"seed": seed} if "seed" in methods.get(method).defaults else {}
        self._for_model: Callable | None = None  # built when first asked for
        self._shifted: Any = None  # the engine of shifted inputs, built when first asked for

    def _maps(self, engine: Any, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from .. import methods

        out = methods.compute(engine, images, [self.method], targets=targets, **self.opts)[self.method]
        return _as_maps(out, len(images), images.shape[2:], self.method)

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return self._maps(self.engine, images, targets)

    def for_model(self, model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from ..metrics.randomisation_mprt import model_explainer

        if model is self.engine.source_model:  # the trained model: the run's own engine
            return self(images, np.asarray(targets))
        if self._for_model is None:
            self._for_model = model_explainer(self.method, self.opts, **self._engine_options())
        return _as_maps(self._for_model(model, images, np.asarray(targets)), len(images),
                        images.shape[2:], self.method)

    def shifted(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The method's maps of ``images`` (already shifted by ``shift``) on the run's model
        behind a preprocessing that subtracts the shift first: the shift-compensated model
        f2(x + c) = f(x) of the input-invariance test."""
        from ..engine import Engine

        if self._shifted is None:
            self._shifted = Engine(self.engine.source_model, input_shift=self.shift,
                                   **self._engine_options())
        return self._maps(self._shifted, images, np.asarray(targets))

    def _engine_options(self) -> dict:
        """What an engine of another model, or of shifted inputs, keeps of the run's engine."""
        e = self.engine
        device = "cuda" if e.providers[0] == "CUDAExecutionProvider" else "cpu"
        return {"preprocess": e.preprocess, "device": device, "threads": e.threads,
                "output": e.output}


def _explainer(engine: Any, method: str, seed: int, shift: float = 1.0) -> _Explainer:
    return _Explainer(engine, method, seed, shift)

