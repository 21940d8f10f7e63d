"""The work of ``onnxsal evaluate``: the shard groups (:class:`EvalGroup`, one slice of
images and its pending parts, computed by :func:`iter_eval_group` on an executor) and the
resumable run (:func:`run_evaluate`, :class:`_Run`: plan the parts, load the finished ones,
compute the rest, aggregate them into scores.json)."""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..benchmark import _as_maps, _parse_methods, _safe, default_maps_many, metric_options, package_versions
from ..data import Dataset, per_shape, reads_on_workers
from ..display import printable
from ..errors import InputError, OptionError
from ..metrics import base as metrics
from ..report import atomic_write_text, check_output_dir
from ..runs import EngineSpec, executor_session, load_arrays, model_payload, run_key, save_arrays
from .maps import _digest, load_maps
from .plan import _explainer, _MetricPlan, _with_inputs, plan_metrics, resolve_metric_names
from .report import bootstrap_ci, write_outputs

SHARD_FORMAT = 1

# --------------------------------------------------------------------------------------------
# the work of one slice of images


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
    explainers: dict[str, Any] = {}  # one per method: its engines of other models are built once
    for metric, meth in group.scores:
        explain = None
        if group.can_explain:
            if meth not in explainers:
                explainers[meth] = _explainer(engine, meth, group.seed,
                                              base.get("invariance_shift", 1.0))
            explain = explainers[meth]
        m = metrics.get(metric).from_options(_with_inputs(base, group.masks, explain, engine))
        m.index_offset = group.start  # per-image draws follow the image's index in the data set
        yield part_name(metric, meth), m.evaluate(engine.logits, x, maps[meth], y)


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
        from .. import methods as _methods

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
        from ..engine import Engine

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
                from ..metrics.masks import load_masks

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


