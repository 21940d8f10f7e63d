"""``onnxsal evaluate``: every registered metric that applies, for the maps of several methods
on one model and one data set, with per-image scores and bootstrap confidence intervals
(docs/evaluate.md).

The maps come from onnxsal's methods (computed here, shard by shard) or from a file made
elsewhere (``maps=FILE.npz``: one array per method, [N, H, W] or [N, C, H, W], in the data's
order; see :func:`load_maps` for the checks and the channel-reduction rule). A metric that
cannot apply to the inputs (no masks for a localisation metric, no way to re-explain an image
when the maps come from a file, no labels for accuracy) is skipped with a one-line reason.

The work is split like ``onnxsal benchmark``'s (:mod:`onnxsal.runs`): per slice of
``shard_size`` images, one part holds a method's maps (``maps/``) and one part each metric's
per-image arrays for one method, written atomically under a key that hashes everything it
depends on (model, preprocessing, data, seed, shard size, the code fingerprint; per part the
metric's settings, the masks when the metric reads them, and the maps' content when they
come from a file). A stopped run resumes from its finished parts; an executor (local or Ray)
computes the parts and the driver alone writes them. ``scores.json``, ``scores.md`` and
``plots/*.png`` are made from the parts alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .benchmark import (
    _as_maps,
    _parse_methods,
    _safe,
    default_maps_many,
    metric_options,
    package_versions,
)
from .data import Dataset, per_shape, reads_on_workers
from .display import printable
from .errors import InputError, OptionError, first_line
from .metrics import base as metrics
from .report import atomic_write_json, atomic_write_text, check_output_dir, fmt, markdown_table
from .runs import EngineSpec, executor_session, load_arrays, model_payload, run_key, save_arrays

SHARD_FORMAT = 1
ARROW = {"lower": "\u2193", "higher": "\u2191"}


# --------------------------------------------------------------------------------------------
# maps made elsewhere


def channel_reduction(method: str) -> str:
    """How [N, C, H, W] maps of ``method`` become [N, H, W]: "sum" over channels for a signed
    attribution (onnxsal's signed methods sum, so that sums of attributions stay sums; also
    any name that is not an onnxsal method), "max-abs" (the maximum over channels of the
    absolute value) for an onnxsal method whose maps are magnitudes (original, positive,
    negative, active, inactive, gradcam, ...), as onnxsal reduces its own."""
    from . import methods

    try:
        meth = methods.get(method)
    except OptionError:
        return "sum"
    return "sum" if meth.signed else "max-abs"


def reduce_channels(maps: np.ndarray, rule: str) -> np.ndarray:
    """[N, C, H, W] -> [N, H, W] by ``rule`` ("sum" or "max-abs"); [N, H, W] as it is."""
    a = np.asarray(maps)
    if a.ndim == 3:
        return a.astype(np.float32)
    a = a.astype(np.float64)
    out = a.sum(axis=1) if rule == "sum" else np.abs(a).max(axis=1)
    return out.astype(np.float32)


def _npy_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, read from its header (no data read)."""
    with zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_header(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype, n: int,
                  at_least: bool, hw: tuple[int, int], channels: int) -> None:
    what = f"{where}: array '{printable(key)}' of shape {list(shape)}"
    if dtype.hasobject:
        raise InputError(f"{what} holds Python objects (pickled data is refused)")
    if dtype.kind not in "biuf":
        raise InputError(f"{what} has dtype {dtype}, not numbers")
    if len(shape) not in (3, 4):
        raise InputError(f"{what}: expected [N, H, W] or [N, C, H, W] maps")
    good_n = shape[0] >= n if at_least else shape[0] == n
    if not good_n or tuple(shape[-2:]) != tuple(hw):
        need = f"{'at least ' if at_least else ''}{n} maps of {hw[0]}x{hw[1]}"
        raise InputError(f"{what}: expected {need} (the data's images, in their order)")
    if len(shape) == 4 and shape[1] not in (1, channels):
        raise InputError(f"{what}: {shape[1]} channels; the images have {channels}")


def load_maps(path: str | os.PathLike, methods: Sequence[str] | None, n: int,
              hw: tuple[int, int], channels: int, at_least: bool = False
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({method: float32 [n, H, W]}, {method: channel reduction}) from an .npz with one array
    per method (``methods``: the keys to use, default all), [N, H, W] or [N, C, H, W] (C = 1
    or the images' channels), ``n`` maps of ``hw`` (``at_least``: N >= n, the first n used,
    for a --limit). Each array's header is checked before its data is read; a wrong shape,
    anything but numbers, pickled objects or NaN/Inf is one InputError naming the key."""
    where = f"--maps {printable(path)}"
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{where}: no such file")
    try:
        zf = zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}: not an .npz file ({first_line(exc)})") from None
    with zf:
        keys = [k[:-4] for k in zf.namelist() if k.endswith(".npy")]
        if not keys:
            raise InputError(f"{where}: holds no arrays (expected one per method)")
        use = list(keys) if not methods else list(methods)
        missing = [m for m in use if m not in keys]
        if missing:
            raise InputError(f"{where}: no array for method(s) {', '.join(map(printable, missing))} "
                             f"(it has {', '.join(map(printable, keys))})")
        out, rules = {}, {}
        for k in use:
            try:
                shape, dtype = _npy_header(zf, k)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"{where}: array '{printable(k)}' is unreadable "
                                 f"({first_line(exc)})") from None
            _check_header(where, k, shape, dtype, n, at_least, hw, channels)
            try:
                with zf.open(k + ".npy") as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"{where}: array '{printable(k)}' is unreadable "
                                 f"({first_line(exc)})") from None
            a = a[:n]
            bad = int((~np.isfinite(a)).sum()) if a.dtype.kind == "f" else 0
            if bad:
                raise InputError(f"{where}: array '{printable(k)}' of shape {list(shape)} has "
                                 f"{bad} NaN or infinite values")
            rules[k] = "none" if a.ndim == 3 else channel_reduction(k)
            out[k] = reduce_channels(a, rules[k])
    return out, rules


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# which metrics apply, and their options


class _ProbeExplainer:
    """Stands in for :class:`_Explainer` while the metrics are chosen; never called."""

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("a probe explainer is never called")

    def for_model(self, model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise AssertionError("a probe explainer is never called")


_dummy_explain = _ProbeExplainer()


def _with_inputs(base: dict, masks: np.ndarray | None, explain: Callable | None,
                 engine: Any) -> dict:
    """The metric options for one (slice, method): the plain ones, the masks of the slice,
    ``explain_class(images, targets) -> maps`` re-explaining with the method,
    ``explain_model(model, images, targets) -> maps`` explaining a re-weighted copy of the model
    with it (the MPRT metrics), and the model
    (``engine``: the engine that runs it, ``model``: its ONNX ModelProto)."""
    opts = dict(base)
    if masks is not None:
        opts["masks"] = masks
    if explain is not None:
        opts["explain_class"] = explain
        opts["explain_model"] = explain.for_model
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


# --------------------------------------------------------------------------------------------
# the work of one slice of images


class _Explainer:
    """``explain(images [N, C, H, W], targets [N]) -> maps [N, H, W]`` with ``method`` on the
    run's engine, and :meth:`for_model`: the same on another ONNX model of the same inputs (a
    randomised copy of the model: the engine built for it keeps this engine's preprocessing,
    providers and threads)."""

    def __init__(self, engine: Any, method: str, seed: int):
        from . import methods

        self.engine, self.method = engine, method
        self.opts = {"seed": seed} if "seed" in methods.get(method).defaults else {}
        self._other: tuple[Any, Any] | None = None  # (model, its engine), the last one asked for

    def _maps(self, engine: Any, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from . import methods

        out = methods.compute(engine, images, [self.method], targets=targets, **self.opts)[self.method]
        return _as_maps(out, len(images), images.shape[2:], self.method)

    def __call__(self, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return self._maps(self.engine, images, targets)

    def for_model(self, model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from .engine import Engine

        if self._other is None or self._other[0] is not model:
            e = self.engine
            device = "cuda" if e.providers[0] == "CUDAExecutionProvider" else "cpu"
            self._other = (model, Engine(model, preprocess=e.preprocess, device=device,
                                         threads=e.threads, output=e.output))
        return self._maps(self._other[1], images, np.asarray(targets))


def _explainer(engine: Any, method: str, seed: int) -> _Explainer:
    return _Explainer(engine, method, seed)


def part_name(metric: str | None, method: str) -> str:
    """The name of a part: a method's maps (``metric`` None) or a metric's arrays."""
    return f"maps|{method}" if metric is None else f"score|{metric}|{method}"


@dataclass
class EvalGroup:
    """The pending parts of one slice of images: everything needed to compute them (plain,
    picklable values) and (``files``) where the driver writes each part, relative to the
    output folder."""

    model_index: int
    engine: EngineSpec
    start: int
    stop: int
    images: np.ndarray | None                # None: read by ``reader`` when computed
    labels: np.ndarray | None
    masks: np.ndarray | None
    seed: int
    options: tuple[tuple[str, Any], ...]
    can_explain: bool
    maps: dict[str, np.ndarray]              # maps already known (a file, or stored parts)
    compute: tuple[str, ...]                 # methods whose maps are computed and stored here
    scores: tuple[tuple[str, str], ...]      # pending (metric, method)
    files: dict[str, str] = field(default_factory=dict)
    reader: Any = None  # a SliceReader of a streamed data set
    read_on_worker: bool = True

    def describe(self) -> str:
        return f"images {self.start}:{self.stop}"

    def arrays(self) -> np.ndarray:
        """The group's images, read now when the group holds a reader."""
        return self.images if self.images is not None else self.reader.read().images

    def for_remote(self) -> EvalGroup:
        """What a remote worker gets: the reader when workers read the data from its path
        themselves, else the images, read here when the group is sent."""
        if self.images is not None or self.read_on_worker:
            return self
        return replace(self, images=self.arrays(), reader=None)

    def iter_parts(self, engine: Any) -> Iterator[tuple[str, dict]]:
        return iter_eval_group(self, engine)


def iter_eval_group(group: EvalGroup, engine: Any) -> Iterator[tuple[str, dict]]:
    """Yield (part name, arrays): first the maps computed here (all methods in one
    :func:`default_maps_many` call, which shares their gradient work), then each pending
    metric x method."""
    x, y = group.arrays(), group.labels
    maps = dict(group.maps)
    if group.compute:
        got = default_maps_many(engine, list(group.compute), x, group.seed)
        for meth in group.compute:
            maps[meth] = _as_maps(got[meth], len(x), x.shape[2:], meth)
            yield part_name(None, meth), {"maps": maps[meth]}
    base = dict(group.options)
    for metric, meth in group.scores:
        explain = _explainer(engine, meth, group.seed) if group.can_explain else None
        m = metrics.get(metric).from_options(_with_inputs(base, group.masks, explain, engine))
        yield part_name(metric, meth), m.evaluate(engine.logits, x, maps[meth], y)


# --------------------------------------------------------------------------------------------
# confidence intervals


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                 seed: Any = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean of the finite ``values`` (resampling
    images; ``scipy.stats.bootstrap``), or None with fewer than 2 values or no resamples."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if resamples < 1 or len(v) < 2:
        return None
    if np.ptp(v) == 0:  # every resample has this mean (as the mean itself is computed)
        return [float(v.mean()), float(v.mean())]
    from scipy.stats import bootstrap

    res = bootstrap((v,), np.mean, n_resamples=int(resamples), confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed),
                    batch=max(1, (1 << 22) // len(v)))
    ci = res.confidence_interval
    return [float(ci.low), float(ci.high)]


def _stream(*names: str) -> list[int]:
    return [zlib.crc32(n.encode("utf-8", "surrogateescape")) for n in names]


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# --------------------------------------------------------------------------------------------
# the run


def run_evaluate(model: str | os.PathLike | Any, data: Any,
                 methods: Sequence[str] | str | None = None,
                 metrics: Sequence[str] | str = "all", out: str | os.PathLike = "evaluate", *,
                 maps: str | os.PathLike | None = None, masks: Any = None,
                 limit: int | None = None, seed: int = 0, preprocess: Any = None,
                 device: str = "auto", threads: int | None = None, output: str | None = None,
                 split: str | None = None, shard_size: int = 64, executor: Any = None,
                 bootstrap: int = 1000, confidence: float = 0.95,
                 max_batch_bytes: int = 256 << 20, deletion_metric: str = "accuracy",
                 engine_factory: Callable[[Any], Any] | None = None, progress: bool = True,
                 command: str | None = None, stop_after: int | None = None) -> dict:
    """Score the maps of ``methods`` on ``model`` with ``metrics`` (names, comma lists, or
    'all': every registered metric that applies); write ``out/scores.json``, ``scores.md``
    and ``plots/*.png``; return the content of scores.json (docs/evaluate.md).

    ``maps``: an .npz of maps made elsewhere (one array per method, see :func:`load_maps`);
    ``methods`` then picks keys of it (default: all of them). ``masks``: ground-truth masks
    for the localisation metrics (a folder, ``FILE.npz[:KEY]`` or a CSV of boxes, see
    :func:`onnxsal.metrics.masks.load_masks`, or a bool [N, H, W] array). ``bootstrap``
    resamples (0: none) give the ``confidence`` interval of each mean. ``deletion_metric``:
    the score of black/white deletion (accuracy needs labels, allegiance does not).
    ``engine_factory(model)`` replaces :class:`onnxsal.engine.Engine`; ``stop_after`` stops
    after that many new parts without writing the result files (tests); ``executor``: None or
    "local", "ray", or an object from :func:`onnxsal.executors.make_executor`."""
    check_output_dir(out)  # before any work
    t_start = time.time()
    if shard_size < 1:
        raise OptionError(f"shard size must be positive, got {shard_size}")
    if bootstrap < 0:
        raise OptionError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    if not 0 < confidence < 1:
        raise OptionError(f"confidence must be in (0, 1), got {confidence}")
    metric_list = resolve_metric_names(metrics)
    if maps is None:
        from . import methods as _methods

        if not methods:
            raise OptionError("no methods given (--methods NAME,..., or --maps FILE.npz)")
        method_names = _methods.resolve(_parse_methods(methods))
    else:
        method_names = _parse_methods(methods) if methods else []
    base = metric_options(metric=deletion_metric, max_batch_bytes=max_batch_bytes)
    base["seed"] = int(seed)
    with executor_session(executor, device) as ex:
        run = _Run(model=model, data=data, method_names=method_names, metric_list=metric_list,
                   out=Path(out), maps_file=maps, masks_src=masks, limit=limit, seed=int(seed),
                   preprocess=preprocess, device=device, threads=threads, output=output,
                   split=split, shard_size=shard_size, base=base, executor=ex,
                   engine_factory=engine_factory, t_start=t_start, progress=progress)
        run.prepare()
        if not run.execute(progress, stop_after):
            return {"complete": False, "parts": len(run.plan), "done": run.done()}
        return run.finish(bootstrap, confidence, command)


@dataclass
class _Run:
    model: Any
    data: Any
    method_names: list[str]
    metric_list: list[str]
    out: Path
    maps_file: Any
    masks_src: Any
    limit: int | None
    seed: int
    preprocess: Any
    device: str
    threads: int | None
    output: str | None
    split: str | None
    shard_size: int
    base: dict
    executor: Any
    engine_factory: Callable[[Any], Any] | None
    t_start: float
    progress: bool = True
    engine: Any = None
    ds: Any = None
    given: dict = field(default_factory=dict)          # method -> maps from the file
    reduction: dict = field(default_factory=dict)
    masks: np.ndarray | None = None
    plans: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    root: Path = Path()
    spec: Any = None
    map_ids: dict = field(default_factory=dict)        # method -> what its maps are
    plan: dict = field(default_factory=dict)           # part (name, start) -> (stop, path)
    parts: dict = field(default_factory=dict)          # (metric, method, start) -> arrays
    maps_done: set = field(default_factory=set)        # (method, start)
    computed: int = 0

    # -- setting up ------------------------------------------------------------------------
    def _make_engine(self) -> Any:
        if self.engine_factory is not None:
            return self.engine_factory(self.model)
        from .engine import Engine

        # when remote workers compute, the driver may have no GPU: it plans on the CPU
        plan_device = self.device if self.executor.in_process else "cpu"
        return Engine(self.model, preprocess=self.preprocess, device=plan_device,
                      threads=self.threads, output=self.output)

    def _load_inputs(self) -> None:
        ds = self.ds
        n, (c, h, w) = len(ds), ds.shape
        if self.maps_file is not None:
            if ds.failures:
                raise InputError(f"--maps: {len(ds.failures)} images of the data could not be "
                                 f"read (first: {printable(ds.failures[0][0])}), so the maps "
                                 "cannot be matched to the images by their order")
            self.given, self.reduction = load_maps(self.maps_file, self.method_names or None,
                                                   n, (h, w), c, at_least=self.limit is not None)
            self.method_names = list(self.given)
        if self.masks_src is not None:
            if isinstance(self.masks_src, (str, os.PathLike)):
                from .metrics.masks import load_masks

                self.masks = load_masks(self.masks_src, list(ds.names), (h, w))
            else:
                self.masks = np.asarray(self.masks_src, bool)
                if self.masks.shape != (n, h, w):
                    raise InputError(f"masks have shape {self.masks.shape}; expected "
                                     f"[{n}, {h}, {w}] (one per image)")

    def prepare(self) -> None:
        """Build the driver's engine, read the data, maps and masks, pick the metrics, plan
        the parts and load the finished ones."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.engine = eng = self._make_engine()
        self.ds = ds = per_shape(self.data, self.limit, self.split, progress=self.progress)(eng)
        if len(ds) == 0:
            raise InputError("no images to evaluate")
        self._load_inputs()
        self.plans, self.skipped = plan_metrics(self.metric_list, self.base, ds, eng,
                                                self.masks, self.maps_file is None)
        pre = getattr(eng, "preprocess", None)
        key, key_src = run_key({
            "model": eng.model_hash, "output": self.output, "data": ds.fingerprint(),
            "preprocess": pre.to_json() if hasattr(pre, "to_json") else json.dumps(str(pre)),
            "seed": self.seed, "shard_size": self.shard_size}, SHARD_FORMAT)
        name = Path(self.model).stem if isinstance(self.model, (str, os.PathLike)) else "model"
        self.root = self.out / "shards" / f"{_safe(name)}-{key}"
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "key.json").is_file():
            atomic_write_text(self.root / "key.json", key_src + "\n")
        self.spec = EngineSpec(key=f"0-{key}", model_hash=str(eng.model_hash),
                               preprocess=self.preprocess, device=self.device,
                               threads=self.threads, output=self.output,
                               factory=self.engine_factory)
        for meth in self.method_names:
            self.map_ids[meth] = ("onnxsal" if meth not in self.given
                                  else "file-" + _digest(self.given[meth])[:12])
        self._plan_parts()

    def _plan_parts(self) -> None:
        n = len(self.ds)
        for s in range(0, n, self.shard_size):
            e = min(n, s + self.shard_size)
            span = f"{s:07d}-{e:07d}"
            for meth in self.method_names:
                mid = f"{_safe(meth)}-{self.map_ids[meth]}"
                if meth not in self.given:
                    path = self.root / "maps" / f"{mid}-{span}.npz"
                    self.plan[(part_name(None, meth), s)] = (e, path)
                    if path.is_file() and load_arrays(path, {"maps"}) is not None:
                        self.maps_done.add((meth, s))
                for p in self.plans:
                    path = self.root / f"{_safe(p.name)}-{p.key}" / f"{mid}-{span}.npz"
                    self.plan[(part_name(p.name, meth), s)] = (e, path)
                    loaded = load_arrays(path, set(p.obj.arrays))
                    if loaded is not None:
                        self.parts[(p.name, meth, s)] = loaded

    def done(self) -> int:
        return len(self.parts) + len(self.maps_done)

    # -- computing ---------------------------------------------------------------------------
    def _groups(self) -> list[EvalGroup]:
        groups = []
        n = len(self.ds)
        for s in range(0, n, self.shard_size):
            e = min(n, s + self.shard_size)
            scores = tuple((p.name, m) for m in self.method_names for p in self.plans
                           if (p.name, m, s) not in self.parts)
            need = list(dict.fromkeys(m for _, m in scores))
            compute = [m for m in self.method_names if m not in self.given
                       and (m, s) not in self.maps_done and (m in need or not scores)]
            if not scores and not compute:
                continue
            known = {}
            for m in need:
                if m in self.given:
                    known[m] = self.given[m][s:e]
                elif m not in compute:
                    loaded = load_arrays(self.plan[(part_name(None, m), s)][1], {"maps"})
                    if loaded is None:  # vanished since planning: compute it again
                        compute.append(m)
                    else:
                        known[m] = loaded["maps"]
            ds = self.ds
            streamed = not isinstance(ds, Dataset)
            g = EvalGroup(model_index=0, engine=self.spec, start=s, stop=e,
                          images=None if streamed else ds.images[s:e],
                          reader=ds.reader(slice(s, e)) if streamed else None,
                          read_on_worker=reads_on_workers(None, self.executor),
                          labels=None if ds.labels is None else ds.labels[s:e],
                          masks=None if self.masks is None else self.masks[s:e], seed=self.seed,
                          options=tuple(self.base.items()),
                          can_explain=self.maps_file is None, maps=known,
                          compute=tuple(compute), scores=scores)
            for m in compute:
                g.files[part_name(None, m)] = str(self.plan[(part_name(None, m), s)][1]
                                                  .relative_to(self.out))
            for metric, m in scores:
                g.files[part_name(metric, m)] = str(self.plan[(part_name(metric, m), s)][1]
                                                    .relative_to(self.out))
            groups.append(g)
        return groups

    def execute(self, progress: bool, stop_after: int | None) -> bool:
        """Compute the pending parts with the executor; True when every score part is done."""
        groups = self._groups()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.plan), initial=self.done(), unit="part",
                       desc=f"evaluate ({self.executor.name})", dynamic_ncols=True)

        def deliver(group: EvalGroup, name: str, part: dict) -> None:
            save_arrays(self.out / group.files[name], part)
            kind, _, rest = name.partition("|")
            if kind == "maps":
                self.maps_done.add((rest, group.start))
            else:  # a method's name (a key of a --maps file) may hold any character
                metric, _, meth = rest.partition("|")
                self.parts[(metric, meth, group.start)] = part
            self.computed += 1
            if bar is not None:
                bar.update(1)

        def status(text: str) -> None:
            if bar is not None:
                bar.set_postfix_str(text)

        def payload(i: int) -> Any:
            src = self.model if self.engine_factory else self.engine.source_model
            return model_payload(src, self.engine_factory)

        try:
            self.executor.run(groups, contexts=[self.engine], payload=payload, deliver=deliver,
                              should_stop=lambda: stop_after is not None
                              and self.computed >= stop_after, status=status)
        finally:
            if bar is not None:
                bar.close()
        starts = range(0, len(self.ds), self.shard_size)
        return all((p.name, m, s) in self.parts for p in self.plans for m in self.method_names
                   for s in starts)

    # -- results -------------------------------------------------------------------------------
    def _entries(self, p: _MetricPlan, meth: str, bootstrap: int, confidence: float
                 ) -> dict[str, dict]:
        """{score column: entry} of metric ``p`` for ``meth``."""
        names = list(self.ds.names)
        starts = range(0, len(self.ds), self.shard_size)
        res = p.obj.aggregate([self.parts[(p.name, meth, s)] for s in starts])
        summary = p.obj.summarize(res, names)
        why = {f["name"]: f["error"] for f in summary.get("failures", [])}
        details = {k: v for k, v in summary.items()
                   if k not in ("failures", "direction", "images", "valid_images")}
        out = {}
        for variant, values in p.obj.per_image_scores(res).items():
            col = p.name if not variant else f"{p.name}:{variant}"
            v = np.asarray(values, np.float64)
            ok = np.isfinite(v)
            out[col] = {
                "mean": _num(v[ok].mean()) if ok.any() else None,
                "ci": bootstrap_ci(v, bootstrap, confidence, [self.seed, *_stream(col, meth)]),
                "images": len(v), "valid_images": int(ok.sum()),
                "failed": [{"image": names[j], "error": why.get(names[j], "no finite score")}
                           for j in np.flatnonzero(~ok)],
                "per_image": [{"image": nm, "score": _num(x)} for nm, x in zip(names, v)],
                "details": details,
            }
        return out

    def finish(self, bootstrap: int, confidence: float, command: str | None) -> dict:
        """Aggregate the parts; write scores.json, scores.md and plots/."""
        scores: dict[str, dict] = {}
        for p in self.plans:
            for meth in self.method_names:
                for col, entry in self._entries(p, meth, bootstrap, confidence).items():
                    sc = scores.setdefault(col, {"metric": p.name, "variant": col[len(p.name) + 1:],
                                                 "direction": p.obj.direction,
                                                 "settings": p.obj.settings(), "methods": {}})
                    sc["methods"][meth] = entry
        eng, ds = self.engine, self.ds
        pre = getattr(eng, "preprocess", None)
        data_desc = ds.describe()
        summary = {
            "tool": "onnxsal evaluate", "command": command,
            "settings": {
                "methods": self.method_names, "metrics": self.metric_list,
                "metrics_scored": [p.name for p in self.plans], "seed": self.seed,
                "limit": self.limit, "shard_size": self.shard_size, "device": self.device,
                "preprocess": self.preprocess if isinstance(self.preprocess, (str, type(None)))
                else str(self.preprocess),
                "deletion_metric": self.base["metric"],
                "bootstrap": {"resamples": int(bootstrap), "confidence": confidence,
                              "method": "percentile", "unit": "image", "statistic": "mean"},
                "maps": ({"source": "onnxsal"} if self.maps_file is None else
                         {"source": "file", "file": str(self.maps_file),
                          "channel_reduction": self.reduction,
                          "sha256": {m: _digest(a) for m, a in self.given.items()}}),
                "masks": None if self.masks_src is None else
                (str(self.masks_src) if isinstance(self.masks_src, (str, os.PathLike))
                 else "array"),
            },
            "model": {"path": str(self.model) if isinstance(self.model, (str, os.PathLike))
                      else None, "hash": eng.model_hash,
                      "input_shape": list(map(int, eng.input_shape)),
                      "num_classes": int(eng.num_classes),
                      "preprocess": json.loads(pre.to_json()) if hasattr(pre, "to_json") else str(pre),
                      "provider": self.executor.providers.get(0, getattr(eng, "provider", None)),
                      "gradients": getattr(eng, "gradient_source", None),
                      "shards": str(self.root.relative_to(self.out))},
            "data": data_desc, "skipped": self.skipped, "scores": scores,
            "versions": package_versions(),
            "timing": {"seconds_this_run": round(time.time() - self.t_start, 3),
                       "parts_computed_this_run": self.computed, "parts_total": len(self.plan),
                       "executor": self.executor.describe()},
        }
        write_outputs(self.out, summary)
        summary["complete"] = True
        return summary


# --------------------------------------------------------------------------------------------
# result files


def scores_table(summary: dict) -> str:
    """Method rows, one column per score ("mean [lo, hi]", the best mean in bold, the
    direction arrow in the header); '' when no metric applied."""
    cols = list(summary["scores"])
    if not cols:
        return ""
    meths = summary["settings"]["methods"]
    best = {}
    for c in cols:
        sc = summary["scores"][c]
        vals = [e["mean"] for e in sc["methods"].values() if e["mean"] is not None]
        best[c] = (min if sc["direction"] == "lower" else max)(vals) if vals else None
    rows = []
    for m in meths:
        row = [m]
        for c in cols:
            e = summary["scores"][c]["methods"].get(m)
            if e is None:
                row.append("-")
                continue
            cell = fmt(e["mean"])
            if e["mean"] is not None and e["mean"] == best[c] and len(meths) > 1:
                cell = f"**{cell}**"
            if e["ci"] is not None:
                cell += f" [{fmt(e['ci'][0])}, {fmt(e['ci'][1])}]"
            row.append(cell)
        rows.append(row)
    return markdown_table(["method"] + [f"{c} {ARROW[summary['scores'][c]['direction']]}"
                                        for c in cols], rows)


def scores_markdown(summary: dict) -> str:
    """scores.md: what was scored, :func:`scores_table`, then what was skipped and why."""
    b = summary["settings"]["bootstrap"]
    d = summary["data"]
    src = summary["settings"]["maps"]
    src = "onnxsal" if src["source"] == "onnxsal" else f"`{src['file']}`"
    lines = ["# onnxsal evaluate", "",
             f"Model `{summary['model']['path'] or 'model'}` (sha256 {summary['model']['hash'][:12]}), "
             f"{d['count']} images of {d['source']}; maps from {src}.", "",
             f"Cells: mean over images [{b['confidence']:.0%} percentile bootstrap interval, "
             f"{b['resamples']} resamples of the images]; arrows: which direction is better; "
             "bold: the best method.", "",
             scores_table(summary) or "No metric applied.\n"]
    if summary["skipped"]:
        lines.append("Skipped:\n")
        lines += [f"- {s['metric']}: {s['reason']}" for s in summary["skipped"]]
        lines.append("")
    return "\n".join(lines)


def plot_scores(summary: dict, column: str, path: str | os.PathLike) -> None:
    """One bar per method: the mean, the confidence interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes
    from .overlays import png_bytes

    sc = summary["scores"][column]
    meths = list(sc["methods"])
    mean = np.array([np.nan if sc["methods"][m]["mean"] is None else sc["methods"][m]["mean"]
                     for m in meths])
    ci = [sc["methods"][m]["ci"] for m in meths]
    lo = np.array([mean[i] - c[0] if c else 0.0 for i, c in enumerate(ci)])
    hi = np.array([c[1] - mean[i] if c else 0.0 for i, c in enumerate(ci)])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(meths) + 2), 3.6))
    ax.bar(range(len(meths)), np.nan_to_num(mean), yerr=np.vstack([lo, hi]), capsize=4,
           color="#4c72b0")
    ax.set_xticks(range(len(meths)), [printable(m) for m in meths], rotation=30, ha="right")
    better = "lower" if sc["direction"] == "lower" else "higher"
    ax.set_title(f"{column} ({better} is better)")
    ax.set_ylabel(f"mean, {summary['settings']['bootstrap']['confidence']:.0%} CI")
    ax.grid(axis="y", alpha=0.3)
    atomic_write_bytes(path, png_bytes(fig, dpi=100, metadata={"Software": None}))


def write_outputs(out: Path, summary: dict) -> None:
    """scores.json, scores.md, then one plot per score column (a failed plot is listed in
    scores.json, never costs the scores)."""
    from .overlays import draw_figures

    atomic_write_json(out / "scores.json", summary)
    atomic_write_text(out / "scores.md", scores_markdown(summary))
    figs = [(f"plots/{_safe(c)}.png",
             lambda c=c: plot_scores(summary, c, out / "plots" / f"{_safe(c)}.png"))
            for c in summary["scores"]]
    failed = draw_figures(figs)
    if failed:
        summary["figure_failures"] = [{"name": n, "error": e} for n, e in failed]
        atomic_write_json(out / "scores.json", summary)
