"""The black/white-deletion benchmark driver: several models x several methods x one data set.

Work is split into shards (model x method x a slice of images). Each shard's per-image
predictions are written atomically to ``OUT/shards/`` as soon as it finishes, under a key
that hashes everything the shard depends on (model content, preprocessing, data fingerprint,
metric, fractions, seed, shard size), so an interrupted run resumes from its finished shards
and gives the same final results as an uninterrupted one. The final files (``results.json``,
``results.md``, ``curves.csv``, ``curves.png``) are computed from the shards alone.

The work of one (model, slice) is a :class:`ShardGroup`: plain values (the model's engine
options, the images, labels, methods, seed and metric settings) that :func:`compute_group`, a
plain function, turns into one shard part per method. An executor (:mod:`onnxsal.executors`:
the local loop, or Ray actors) runs the groups and hands each part back to the driver, which
alone writes the shard files and merges them, with the same code for every executor.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .data import Dataset, per_shape, reads_on_workers
from .errors import OnnxsalError, OptionError
from .metrics import base as metrics
from .metrics.deletion import FRACTIONS, MODES, BlackWhiteDeletion
from .overlays import draw_figures
from .report import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    deletion_csv_rows,
    deletion_markdown,
    plot_deletion_curves,
    write_csv,
)
from .runs import EngineSpec, executor_session, load_arrays, model_payload, run_key, save_arrays

MapsFn = Callable[[Any, str, np.ndarray], np.ndarray]
SHARD_FORMAT = 1


def default_maps_many(engine, method_names: Sequence[str], images: np.ndarray,
                      seed: int | None = None) -> dict[str, Any]:
    """{method: Maps} from :func:`onnxsal.methods.compute`, which shares the gradient work
    of methods run on the same images; seeded methods get ``seed``."""
    from . import methods

    opts: dict[str, Any] = {}
    if seed is not None and any("seed" in methods.get(m).defaults for m in method_names):
        opts["seed"] = seed
    return methods.compute(engine, images, list(method_names), **opts)


def _as_maps(out: Any, n: int, hw: tuple[int, int], method: str) -> np.ndarray:
    maps = np.asarray(getattr(out, "maps", out))
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.shape != (n,) + tuple(hw):
        raise OnnxsalError(f"method '{method}' returned maps of shape {maps.shape}; expected "
                           f"({n}, {hw[0]}, {hw[1]})")
    return maps.astype(np.float32, copy=False)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("onnxsal", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "scikit-image",
                 "scipy", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:64] or "_"


def _model_names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem if isinstance(p, (str, os.PathLike)) else f"model{i}"
             for i, p in enumerate(paths)]
    out = []
    for i, s in enumerate(stems):
        out.append(s if stems.count(s) == 1 else f"{s}#{i + 1}")
    return out


def _parse_methods(methods: Sequence[str] | str) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    out: list[str] = []
    for m in methods:
        for part in str(m).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    if not out:
        raise OptionError("no methods given (e.g. --methods original,positive,negative)")
    return out


@dataclass(frozen=True)
class MetricSpec:
    """The metrics of a benchmark (registered names) and their options (plain values, so that
    a spec reaches a worker; each metric takes the options it knows, see
    :meth:`onnxsal.metrics.base.Metric.from_options`)."""

    names: tuple[str, ...] = (BlackWhiteDeletion.name,)
    options: tuple[tuple[str, Any], ...] = ()

    def build(self) -> list[metrics.Metric]:
        opts = dict(self.options)
        return [metrics.get(n).from_options(opts) for n in self.names]


def metric_options(metric: str = "accuracy", fractions: Sequence[float] = FRACTIONS,
                   modes: Sequence[str] = MODES, max_batch_bytes: int = 256 << 20,
                   rise_baseline: str = "black", rise_step: int | None = None) -> dict[str, Any]:
    """The plain options every metric is built from (:meth:`Metric.from_options`): the
    deletion benchmark's score (``metric``), fractions and modes, the memory budget of one
    batch and RISE's baseline and step (``onnxsal benchmark`` and ``onnxsal evaluate``)."""
    return {"metric": metric, "fractions": tuple(map(float, fractions)),
            "modes": tuple(modes), "max_batch_bytes": int(max_batch_bytes),
            "rise_baseline": rise_baseline, "rise_step": rise_step}


def metric_names(rise: bool, extra: Sequence[str] | str = ()) -> tuple[str, ...]:
    """Black/white deletion, RISE deletion and insertion with ``rise``, then the ``extra``
    registered metrics (comma lists allowed); unknown names are refused here."""
    out = [BlackWhiteDeletion.name] + (["deletion", "insertion"] if rise else [])
    for m in [extra] if isinstance(extra, str) else extra:
        out += [p.strip() for p in str(m).split(",") if p.strip()]
    out = list(dict.fromkeys(out))
    for n in out:
        metrics.get(n)
    return tuple(out)


@dataclass
class ShardGroup:
    """The pending shards of one model on one slice of images: everything needed to compute
    them, and (``files``) where the driver writes each method's part, relative to the output
    folder."""

    model_index: int
    model_name: str
    engine: EngineSpec
    start: int
    stop: int
    methods: tuple[str, ...]
    images: np.ndarray | None
    labels: np.ndarray | None
    seed: int
    metric: MetricSpec
    files: dict[str, str] = field(default_factory=dict)
    maps_fn: MapsFn | None = None
    reader: Any = None  # a SliceReader: the images are read when the group is computed
    read_on_worker: bool = True

    def describe(self) -> str:
        return f"{self.model_name} {self.start}:{self.stop}"

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(images, labels) of the group, read now when the group holds a reader."""
        if self.images is not None:
            return self.images, self.labels
        return self.reader.read().images, self.labels

    def for_remote(self) -> "ShardGroup":
        """What is sent to a remote worker: the reader when workers read the data from its
        path themselves, else the images, read here (one group at a time, when it is sent)."""
        if self.images is not None or self.read_on_worker:
            return self
        return replace(self, images=self.arrays()[0], reader=None)

    def iter_parts(self, engine: Any) -> Iterator[tuple[str, dict]]:
        """(method, shard part) pairs: :func:`iter_group`."""
        return iter_group(self, engine)


def iter_group(group: ShardGroup, engine: Any) -> Iterator[tuple[str, dict]]:
    """Yield (method, shard part) for each method of ``group``, computed with ``engine``: the
    arrays of every metric, named by :meth:`~onnxsal.metrics.base.Metric.shard_key`.

    The maps of all methods come from one :func:`default_maps_many` call (shared gradient
    work) unless the group carries its own ``maps_fn``."""
    metric_objs = group.metric.build()
    x, y = group.arrays()
    methods = list(group.methods)
    all_maps = default_maps_many(engine, methods, x, group.seed) if group.maps_fn is None else None
    for meth in methods:
        raw_maps = all_maps[meth] if all_maps is not None else group.maps_fn(engine, meth, x)
        maps = _as_maps(raw_maps, len(x), x.shape[2:], meth)
        part = {}
        for m in metric_objs:
            arrays = m.evaluate(engine.logits, x, maps, y)
            part.update({m.shard_key(k): v for k, v in arrays.items()})
        yield meth, part


def compute_group(group: ShardGroup, engine: Any) -> dict[str, dict]:
    """{method: shard part} of ``group`` (what a remote worker returns)."""
    return dict(iter_group(group, engine))


def run_benchmark(models: Sequence[str | os.PathLike], data: Any, methods: Sequence[str] | str,
                  metric: str = "accuracy", limit: int | None = None,
                  out_dir: str | os.PathLike = "benchmark", maps_fn: MapsFn | None = None, *,
                  preprocess: Any = None, device: str = "auto", seed: int = 0,
                  shard_size: int = 256, fractions: Sequence[float] = FRACTIONS,
                  modes: Sequence[str] = MODES, threads: int | None = None,
                  output: str | None = None, split: str | None = None,
                  engine_factory: Callable[[Any], Any] | None = None,
                  progress: bool = True, max_batch_bytes: int = 256 << 20,
                  rise: bool = False, rise_baseline: str = "black",
                  rise_step: int | None = None, metrics_extra: Sequence[str] | str = (),
                  command: str | None = None, stop_after: int | None = None,
                  executor: Any = None, data_on_workers: bool | None = None) -> dict:
    """Run black/white deletion (and the other selected metrics) for every model x method;
    write the result files; return the results dictionary (the content of ``results.json``).

    ``maps_fn(engine, method, images) -> [N, H, W]`` (or a ``Maps``) computes the maps
    (default: :func:`onnxsal.methods.compute` on each slice of images, which shares the
    gradient work of the methods; seeded methods get ``seed``). ``rise`` adds RISE deletion
    (``rise_baseline``) and insertion, ``rise_step`` pixels per step (default one row);
    ``metrics_extra`` adds registered metrics by name (:mod:`onnxsal.metrics.base`).
    ``engine_factory(model)`` builds an engine (default :class:`onnxsal.engine.Engine` with
    ``preprocess``, ``device``, ``threads``, ``output``). ``stop_after`` stops after that many
    newly computed shards, without writing the final files (what an interruption does; used
    by tests). ``executor`` runs the shard groups: None or "local" (this process), "ray", or an
    object from :func:`onnxsal.executors.make_executor`; the result files do not depend on it.

    Data given as a path or a built-in name is streamed (:func:`onnxsal.data.stream_dataset`):
    one pass learns the names, labels and fingerprint, and each shard reads its own slice when
    it is computed. ``data_on_workers``: remote workers read their slice from the path (True)
    or get the images from the driver (False); default :func:`onnxsal.data.reads_on_workers`.
    """
    check_output_dir(out_dir)  # before any work
    t_start = time.time()
    models = list(models)
    if not models:
        raise OptionError("no models given")
    method_names = _parse_methods(methods)
    if maps_fn is None:
        from . import methods as _methods

        method_names = _methods.resolve(method_names)
    if shard_size < 1:
        raise OptionError(f"shard size must be positive, got {shard_size}")
    options = metric_options(metric=metric, fractions=fractions, modes=modes,
                             max_batch_bytes=max_batch_bytes, rise_baseline=rise_baseline,
                             rise_step=rise_step)
    metric_spec = MetricSpec(metric_names(rise, metrics_extra), tuple(options.items()))
    settings = {"metric": metric, "methods": method_names,
                "fractions": [float(p) for p in fractions], "modes": list(modes),
                "auc": "trapezoid, dx = 0.1, not normalised", "limit": limit, "seed": seed,
                "rise": ({"baseline": rise_baseline, "insertion_start": "blur",
                          "step": rise_step or "one image row", "score":
                          "softmax probability of the clean prediction",
                          "auc": "trapezoid over [0, 1]"} if rise else None),
                "metrics": list(metric_spec.names),
                "preprocess": preprocess if isinstance(preprocess, (str, type(None)))
                else str(preprocess), "shard_size": shard_size, "device": device}
    with executor_session(executor, device) as ex:
        run = _Run(models=models, data=data, method_names=method_names, limit=limit,
                   out=Path(out_dir), maps_fn=maps_fn, preprocess=preprocess, device=device,
                   seed=seed, shard_size=shard_size, threads=threads, output=output,
                   split=split, engine_factory=engine_factory, metric_spec=metric_spec,
                   metric_objs=metric_spec.build(), executor=ex, t_start=t_start,
                   on_workers=ex.in_process or reads_on_workers(data_on_workers, ex))
        run.prepare(progress)
        if not run.execute(progress, stop_after):
            return {"complete": False, "shards": len(run.plan), "done": len(run.parts)}
        return run.finish(settings, command)


@dataclass
class _Run:
    """One benchmark run: its engines, data, shard plan, finished parts and outputs."""

    models: list
    data: Any
    method_names: list[str]
    limit: int | None
    out: Path
    maps_fn: MapsFn | None
    preprocess: Any
    device: str
    seed: int
    shard_size: int
    threads: int | None
    output: str | None
    split: str | None
    engine_factory: Callable[[Any], Any] | None
    metric_spec: MetricSpec
    metric_objs: list
    executor: Any
    t_start: float
    on_workers: bool = True
    engines: list = field(default_factory=list)
    names: list = field(default_factory=list)
    model_info: list = field(default_factory=list)
    plan: list = field(default_factory=list)  # (model index, slice, method, path)
    parts: dict = field(default_factory=dict)  # (model index, method, start) -> part
    computed: int = 0

    def prepare(self, progress: bool = False) -> None:
        """Build the driver's engines, read the data, plan the shards, load the finished."""
        self.out.mkdir(parents=True, exist_ok=True)
        factory = self.engine_factory
        if factory is None:
            from .engine import Engine

            # the driver's engines plan the work (shapes, classes, hashes); when remote
            # workers compute, the driver may have no GPU, so it plans on the CPU
            plan_device = self.device if self.executor.in_process else "cpu"

            def factory(m):
                return Engine(m, preprocess=self.preprocess, device=plan_device,
                              threads=self.threads, output=self.output)

        self.engines = [factory(m) for m in self.models]
        self.names = _model_names(self.models)
        data_for = per_shape(self.data, self.limit, self.split, progress=progress)
        for i, (eng, name) in enumerate(zip(self.engines, self.names)):
            self._plan_model(i, eng, name, data_for(eng))
        for info in self.model_info:
            info["dir"].mkdir(parents=True, exist_ok=True)
            kp = info["dir"] / "key.json"
            if not kp.is_file():
                atomic_write_text(kp, info["key_src"] + "\n")
        need = {m.shard_key(k) for m in self.metric_objs for k in m.arrays}
        for item in self.plan:
            loaded = load_arrays(item[3], need)  # a shard lacking an array is recomputed
            if loaded is not None:
                self.parts[(item[0], item[2], item[1].start)] = loaded

    def _plan_model(self, i: int, eng: Any, name: str, ds: Dataset) -> None:
        for m in self.metric_objs:
            m.check_labels(ds.labels, eng.num_classes, name, ds.source)
        pre = getattr(eng, "preprocess", None)
        pre_json = pre.to_json() if hasattr(pre, "to_json") else json.dumps(str(pre))
        key, key_src = run_key({
            "model": eng.model_hash, "preprocess": pre_json, "output": self.output,
            "data": ds.fingerprint(), "metrics": {m.name: m.settings() for m in self.metric_objs},
            "seed": self.seed, "shard_size": self.shard_size,
            "maps_fn": "default" if self.maps_fn is None else
            getattr(self.maps_fn, "__qualname__", repr(type(self.maps_fn)))}, SHARD_FORMAT)
        sdir = self.out / "shards" / f"{_safe(name)}-{key}"
        spec = EngineSpec(key=f"{i}-{key}", model_hash=str(eng.model_hash),
                          preprocess=self.preprocess, device=self.device, threads=self.threads,
                          output=self.output, factory=self.engine_factory)
        self.model_info.append({"dir": sdir, "key_src": key_src, "data": ds, "spec": spec})
        for s in range(0, len(ds), self.shard_size):
            sl = slice(s, min(len(ds), s + self.shard_size))
            for meth in self.method_names:
                self.plan.append((i, sl, meth,
                                  sdir / f"{_safe(meth)}-{sl.start:07d}-{sl.stop:07d}.npz"))

    def _groups(self) -> list[ShardGroup]:
        """The pending shards, one group per (model, slice)."""
        groups: dict[tuple[int, int], ShardGroup] = {}
        for i, sl, meth, path in self.plan:
            if (i, meth, sl.start) in self.parts:
                continue
            g = groups.get((i, sl.start))
            if g is None:
                ds = self.model_info[i]["data"]
                eager = isinstance(ds, Dataset)
                g = groups[(i, sl.start)] = ShardGroup(
                    model_index=i, model_name=self.names[i], engine=self.model_info[i]["spec"],
                    start=sl.start, stop=sl.stop, methods=(),
                    images=ds.images[sl] if eager else None,
                    labels=None if ds.labels is None else ds.labels[sl], seed=self.seed,
                    metric=self.metric_spec, maps_fn=self.maps_fn,
                    reader=None if eager else ds.reader(sl), read_on_worker=self.on_workers)
            g.methods += (meth,)
            g.files[meth] = str(path.relative_to(self.out))
        return list(groups.values())

    def execute(self, progress: bool, stop_after: int | None) -> bool:
        """Compute the pending shards with the executor; True when every shard is done."""
        groups = self._groups()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            # one tick per image and method: the rate is in images (x methods) per second
            bar = tqdm(total=sum(sl.stop - sl.start for _, sl, _, _ in self.plan),
                       initial=sum(sl.stop - sl.start for i, sl, m, _ in self.plan
                                   if (i, m, sl.start) in self.parts),
                       unit="img", desc=f"benchmark ({self.executor.name})", dynamic_ncols=True)

        def deliver(group: ShardGroup, meth: str, part: dict) -> None:
            save_arrays(self.out / group.files[meth], part)
            self.parts[(group.model_index, meth, group.start)] = part
            self.computed += 1
            if bar is not None:
                bar.update(group.stop - group.start)

        def status(text: str) -> None:
            if bar is not None:
                bar.set_postfix_str(text)

        def payload(i: int) -> Any:
            model = self.models[i] if self.engine_factory else self.engines[i].source_model
            return model_payload(model, self.engine_factory)

        try:
            self.executor.run(groups, contexts=self.engines, payload=payload, deliver=deliver,
                              should_stop=lambda: stop_after is not None
                              and self.computed >= stop_after, status=status)
        finally:
            if bar is not None:
                bar.close()
        return len(self.parts) == len(self.plan)

    def _aggregate_model(self, i: int) -> tuple[list[dict], dict | None]:
        """The result entries of model ``i`` (one per method) and its clean score."""
        ds = self.model_info[i]["data"]
        starts = sorted({sl.start for (j, sl, _, _) in self.plan if j == i})
        entries, clean = [], None
        for meth in self.method_names:
            entry: dict = {"model": self.names[i], "method": meth}
            for m in self.metric_objs:
                res = m.aggregate([{k: self.parts[(i, meth, s)][m.shard_key(k)]
                                    for k in m.arrays} for s in starts])
                m.place(entry, m.summarize(res, list(ds.names)))
                clean = clean or m.clean_score(res)
            entries.append(entry)
        return entries, clean

    def _model_entry(self, i: int, clean: dict | None) -> dict:
        eng, pre = self.engines[i], getattr(self.engines[i], "preprocess", None)
        path = self.models[i]
        return {
            "name": self.names[i],
            "path": str(path) if isinstance(path, (str, os.PathLike)) else None,
            "hash": eng.model_hash, "input_shape": list(map(int, eng.input_shape)),
            "num_classes": int(eng.num_classes),
            "preprocess": json.loads(pre.to_json()) if hasattr(pre, "to_json") else str(pre),
            "provider": self.executor.providers.get(i, getattr(eng, "provider", None)),
            "gradients": getattr(eng, "gradient_source", None),
            "clean": clean or {"score": float("nan"), "images": 0},
            "shards": str(self.model_info[i]["dir"].relative_to(self.out)),
        }

    def finish(self, settings: dict, command: str | None) -> dict:
        """Aggregate the shards and write results.json, results.md, curves.csv, curves.png."""
        results, models_out = [], []
        for i in range(len(self.engines)):
            entries, clean = self._aggregate_model(i)
            results += entries
            models_out.append(self._model_entry(i, clean))
        first = self.model_info[0]["data"]
        data_desc = first.describe()
        data_desc.pop("fingerprint")
        data_desc["fingerprint"] = first.fingerprint()
        if len({tuple(e.input_shape) for e in self.engines}) > 1:
            data_desc["per_model_fingerprint"] = {n: self.model_info[i]["data"].fingerprint()
                                                  for i, n in enumerate(self.names)}
        summary = {
            "tool": "onnxsal benchmark", "command": command, "settings": settings,
            "data": data_desc, "models": models_out, "results": results,
            "versions": package_versions(),
            "timing": {"seconds_this_run": round(time.time() - self.t_start, 3),
                       "shards_computed_this_run": self.computed,
                       "shards_total": len(self.plan), "executor": self.executor.describe()},
        }
        _write_outputs(self.out, summary)
        summary["complete"] = True
        return summary


def _write_outputs(out: Path, summary: dict) -> None:
    """results.json, results.md, curves.csv and curves.png of a finished run."""
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", deletion_markdown(summary))
    headers, rows = deletion_csv_rows(summary)
    write_csv(out / "curves.csv", headers, rows)
    failed = draw_figures([("curves.png", lambda: plot_deletion_curves(summary, out / "curves.png"))])
    if failed:
        summary["figure_failures"] = [{"name": n, "error": e} for n, e in failed]
        atomic_write_json(out / "results.json", summary)
