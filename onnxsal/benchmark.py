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

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import code_fingerprint
from .data import Dataset, RawImages, conform, load_raw
from .errors import InputError, ModelError, OnnxsalError, OptionError
from .metrics.deletion import FRACTIONS, MODES, BlackWhiteDeletion
from .metrics.rise import RiseDeletion, RiseInsertion
from .report import (atomic_savez, atomic_write_json, atomic_write_text, deletion_csv_rows,
                     deletion_markdown, plot_deletion_curves, write_csv)

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
class EngineSpec:
    """How to build the engine of one model anywhere (plain, picklable values).

    ``key`` identifies the model and its options (the shard key); ``model_hash`` is checked
    against the engine a worker builds from the bytes the driver sent. ``factory(model)``
    replaces :class:`onnxsal.engine.Engine` (tests)."""

    key: str
    model_hash: str
    preprocess: Any = None
    device: str = "auto"
    threads: int | None = None
    output: str | None = None
    factory: Callable[[Any], Any] | None = None

    def build(self, model: Any, default_threads: int | None = None):
        """An engine for ``model`` (serialized ONNX bytes, a path or a ModelProto)."""
        if self.factory is not None:
            return self.factory(model)
        import onnx

        from .engine import Engine

        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        threads = self.threads if self.threads is not None else default_threads
        eng = Engine(model, preprocess=self.preprocess, device=self.device, threads=threads,
                     output=self.output)
        if eng.model_hash != self.model_hash:
            raise ModelError(f"the worker's copy of the model differs from the driver's "
                             f"(hash {eng.model_hash[:12]} != {self.model_hash[:12]})")
        return eng


@dataclass(frozen=True)
class MetricSpec:
    """The metric settings of a benchmark (plain values)."""

    metric: str = "accuracy"
    fractions: tuple[float, ...] = tuple(FRACTIONS)
    modes: tuple[str, ...] = tuple(MODES)
    max_batch_bytes: int = 256 << 20
    rise: bool = False
    rise_baseline: str = "black"
    rise_step: int | None = None

    def build(self) -> tuple[BlackWhiteDeletion, dict]:
        """(black/white deletion metric, {"deletion"|"insertion": RISE metric} or {})."""
        metric = BlackWhiteDeletion(self.metric, self.fractions, self.modes, self.max_batch_bytes)
        rise = {}
        if self.rise:
            rise = {"deletion": RiseDeletion(self.rise_step, self.rise_baseline,
                                             max_batch_bytes=self.max_batch_bytes),
                    "insertion": RiseInsertion(self.rise_step,
                                               max_batch_bytes=self.max_batch_bytes)}
        return metric, rise


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
    images: np.ndarray
    labels: np.ndarray | None
    seed: int
    metric: MetricSpec
    files: dict[str, str] = field(default_factory=dict)
    maps_fn: MapsFn | None = None

    def describe(self) -> str:
        return f"{self.model_name} {self.start}:{self.stop}"

    def iter_parts(self, engine: Any) -> Iterator[tuple[str, dict]]:
        """(method, shard part) pairs: :func:`iter_group`."""
        return iter_group(self, engine)


def iter_group(group: ShardGroup, engine: Any) -> Iterator[tuple[str, dict]]:
    """Yield (method, shard part) for each method of ``group``, computed with ``engine``.

    The maps of all methods come from one :func:`default_maps_many` call (shared gradient
    work) unless the group carries its own ``maps_fn``."""
    metric_obj, rise_objs = group.metric.build()
    x, y = group.images, group.labels
    methods = list(group.methods)
    all_maps = default_maps_many(engine, methods, x, group.seed) if group.maps_fn is None else None
    for meth in methods:
        raw_maps = all_maps[meth] if all_maps is not None else group.maps_fn(engine, meth, x)
        maps = _as_maps(raw_maps, len(x), x.shape[2:], meth)
        part = metric_obj.evaluate_batch(engine.logits, x, maps, y)
        for kind, robj in rise_objs.items():
            rp = robj.evaluate_batch(engine.logits, x, maps)
            part.update({f"rise_{kind}_{k}": v for k, v in rp.items()})
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
                  rise_step: int | None = None,
                  command: str | None = None, stop_after: int | None = None,
                  executor: Any = None) -> dict:
    """Run black/white deletion for every model x method; write the result files; return the
    results dictionary (the content of ``results.json``).

    ``maps_fn(engine, method, images) -> [N, H, W]`` (or a ``Maps``) computes the maps
    (default: :func:`onnxsal.methods.compute` on each slice of images, which shares the
    gradient work of the methods; seeded methods get ``seed``). ``rise`` adds RISE deletion
    (``rise_baseline``) and insertion, ``rise_step`` pixels per step (default one row). ``engine_factory(model)`` builds
    an engine (default :class:`onnxsal.engine.Engine` with ``preprocess``, ``device``,
    ``threads``, ``output``). ``stop_after`` stops after that many newly computed shards,
    without writing the final files (what an interruption does; used by tests).
    ``executor`` runs the shard groups: None or "local" (this process), "ray", or an object
    from :func:`onnxsal.executors.make_executor`; the result files do not depend on it.
    """
    from .executors import make_executor

    if executor is None or isinstance(executor, str):
        executor = make_executor(executor or "local")
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
    metric_spec = MetricSpec(metric, tuple(map(float, fractions)), tuple(modes),
                             int(max_batch_bytes), bool(rise), rise_baseline, rise_step)
    metric_obj, rise_objs = metric_spec.build()
    executor.for_device(device)
    executor.open()
    try:
        return _run(models=models, data=data, method_names=method_names, metric=metric,
                    limit=limit, out_dir=out_dir, maps_fn=maps_fn, preprocess=preprocess,
                    device=device, seed=seed, shard_size=shard_size, fractions=fractions,
                    modes=modes, threads=threads, output=output, split=split,
                    engine_factory=engine_factory, progress=progress, rise=rise,
                    rise_baseline=rise_baseline, rise_step=rise_step, command=command,
                    stop_after=stop_after, executor=executor, metric_spec=metric_spec,
                    metric_obj=metric_obj, rise_objs=rise_objs, t_start=t_start)
    finally:
        executor.close()


def _run(*, models, data, method_names, metric, limit, out_dir, maps_fn, preprocess, device,
         seed, shard_size, fractions, modes, threads, output, split, engine_factory, progress,
         rise, rise_baseline, rise_step, command, stop_after, executor, metric_spec, metric_obj,
         rise_objs, t_start) -> dict:
    """The body of :func:`run_benchmark` between opening and closing the executor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    custom_factory = engine_factory
    if engine_factory is None:
        from .engine import Engine

        # the driver's engines plan the work (shapes, classes, hashes); when remote workers
        # compute, the driver may have no GPU, so it plans on the CPU
        plan_device = device if executor.in_process else "cpu"

        def engine_factory(m):
            return Engine(m, preprocess=preprocess, device=plan_device, threads=threads,
                          output=output)

    engines = [engine_factory(m) for m in models]
    names = _model_names(models)

    # the data: read once, conformed to each model's input shape
    if isinstance(data, Dataset):
        base: Dataset | RawImages = data if limit is None else data.subset(slice(0, limit))
    elif isinstance(data, RawImages):
        base = data
    else:
        base = load_raw(data, limit=limit, split=split)
    conformed: dict[tuple, Dataset] = {}

    def data_for(eng) -> Dataset:
        shape = tuple(eng.input_shape)
        if shape not in conformed:
            if isinstance(base, Dataset) and base.shape == shape:
                conformed[shape] = base
            else:
                raw = base
                if isinstance(base, Dataset):
                    raw = RawImages([im.transpose(1, 2, 0) for im in base.images], base.labels,
                                    list(base.names), base.source, base.class_names,
                                    list(base.notes), list(base.failures))
                conformed[shape] = conform(raw, shape)
        return conformed[shape]

    # plan the shards
    plan = []  # (model index, slice, method, path)
    model_info = []
    for i, (eng, name) in enumerate(zip(engines, names)):
        ds = data_for(eng)
        if metric == "accuracy":
            if ds.labels is None:
                raise OptionError(f"{ds.source} has no labels: metric 'accuracy' needs them "
                                  "(use --metric allegiance)")
            bad = (ds.labels < 0) | (ds.labels >= eng.num_classes)
            if bad.any():
                raise InputError(f"labels out of range for {name} ({eng.num_classes} classes): "
                                 f"{sorted(set(ds.labels[bad].tolist()))[:5]}")
        pre = getattr(eng, "preprocess", None)
        pre_json = pre.to_json() if hasattr(pre, "to_json") else json.dumps(str(pre))
        key_src = json.dumps({"format": SHARD_FORMAT, "code": code_fingerprint(), "model": eng.model_hash,
                              "preprocess": pre_json, "output": output,
                              "data": ds.fingerprint(), "metric": metric,
                              "fractions": list(map(float, fractions)), "modes": list(modes),
                              "seed": seed, "shard_size": shard_size,
                              "rise": {"baseline": rise_baseline, "step": rise_step}
                              if rise else None,
                              "maps_fn": "default" if maps_fn is None else
                              getattr(maps_fn, "__qualname__", repr(type(maps_fn)))},
                             sort_keys=True)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        sdir = out / "shards" / f"{_safe(name)}-{key}"
        spec = EngineSpec(key=f"{i}-{key}", model_hash=str(eng.model_hash),
                          preprocess=preprocess, device=device, threads=threads, output=output,
                          factory=custom_factory)
        model_info.append({"dir": sdir, "key_src": key_src, "data": ds, "spec": spec})
        for s in range(0, len(ds), shard_size):
            sl = slice(s, min(len(ds), s + shard_size))
            for meth in method_names:
                plan.append((i, sl, meth, sdir / f"{_safe(meth)}-{sl.start:07d}-{sl.stop:07d}.npz"))

    for info in model_info:
        info["dir"].mkdir(parents=True, exist_ok=True)
        kp = info["dir"] / "key.json"
        if not kp.is_file():
            atomic_write_text(kp, info["key_src"] + "\n")

    parts: dict[tuple[int, str, int], dict] = {}
    todo = []
    for item in plan:
        loaded = _load_shard(item[3], metric_obj, rise_objs)
        if loaded is None:
            todo.append(item)
        else:
            parts[(item[0], item[2], item[1].start)] = loaded

    groups: dict[tuple[int, int], ShardGroup] = {}
    for i, sl, meth, path in todo:
        g = groups.get((i, sl.start))
        if g is None:
            ds = model_info[i]["data"]
            g = groups[(i, sl.start)] = ShardGroup(
                model_index=i, model_name=names[i], engine=model_info[i]["spec"],
                start=sl.start, stop=sl.stop, methods=(), images=ds.images[sl],
                labels=None if ds.labels is None else ds.labels[sl], seed=seed,
                metric=metric_spec, maps_fn=maps_fn)
        g.methods += (meth,)
        g.files[meth] = str(path.relative_to(out))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="shard",
                   desc=f"benchmark ({executor.name})", dynamic_ncols=True)
    computed = 0

    def deliver(group: ShardGroup, meth: str, part: dict) -> None:
        nonlocal computed
        atomic_savez(out / group.files[meth], **part)
        parts[(group.model_index, meth, group.start)] = part
        computed += 1
        if bar is not None:
            bar.update(1)

    def status(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)

    def payload(i: int) -> Any:
        """What a remote worker builds model ``i`` from: the serialized model (no shared
        file system needed), or the model argument itself for a custom engine factory."""
        if custom_factory is None:
            return engines[i].source_model.SerializeToString()
        return models[i]

    try:
        executor.run(list(groups.values()), contexts=engines, payload=payload, deliver=deliver,
                     should_stop=lambda: stop_after is not None and computed >= stop_after,
                     status=status)
    finally:
        if bar is not None:
            bar.close()
    if len(parts) < len(plan):
        return {"complete": False, "shards": len(plan), "done": len(parts)}

    # aggregate
    results = []
    models_out = []
    for i, (eng, name) in enumerate(zip(engines, names)):
        ds = model_info[i]["data"]
        starts = sorted({sl.start for (j, sl, _, _) in plan if j == i})
        clean = None
        for meth in method_names:
            res = metric_obj.aggregate([parts[(i, meth, s)] for s in starts])
            results.append({"model": name, "method": meth, "images": len(res.errors),
                            "valid_images": res.n_valid, "fractions": res.fractions,
                            "curves": res.curves, "auc": res.auc,
                            "failures": [{"name": n, "error": e}
                                         for n, e in res.failures(ds.names)]})
            if rise_objs:
                entry = {}
                for kind, robj in rise_objs.items():
                    rparts = [{k[len(f"rise_{kind}_"):]: v for k, v in parts[(i, meth, s)].items()
                               if k.startswith(f"rise_{kind}_")} for s in starts]
                    rr = robj.aggregate(rparts)
                    entry[kind] = {"x": rr.x.tolist(), "curve": rr.curve.tolist(), "auc": rr.auc,
                                   "valid_images": int(rr.valid.sum()),
                                   "direction": robj.direction,
                                   "failures": [{"name": ds.names[j], "error": e}
                                                for j, e in enumerate(rr.errors) if e]}
                results[-1]["rise"] = entry
            if clean is None and res.n_valid:
                ok = res.valid
                c0 = res.predictions[modes[0]][ok][:, 0] == res.reference[ok]
                clean = {"score": float(c0.mean()), "images": int(ok.sum())}
        pre = getattr(eng, "preprocess", None)
        models_out.append({
            "name": name, "path": str(models[i]) if isinstance(models[i], (str, os.PathLike)) else None,
            "hash": eng.model_hash, "input_shape": list(map(int, eng.input_shape)),
            "num_classes": int(eng.num_classes),
            "preprocess": json.loads(pre.to_json()) if hasattr(pre, "to_json") else str(pre),
            "provider": executor.providers.get(i, getattr(eng, "provider", None)),
            "gradients": getattr(eng, "gradient_source", None),
            "clean": clean or {"score": float("nan"), "images": 0},
            "shards": str(model_info[i]["dir"].relative_to(out)),
        })
    first = model_info[0]["data"]
    data_desc = first.describe()
    data_desc.pop("fingerprint")
    data_desc["fingerprint"] = first.fingerprint()
    if len({tuple(e.input_shape) for e in engines}) > 1:
        data_desc["per_model_fingerprint"] = {n: model_info[i]["data"].fingerprint()
                                              for i, n in enumerate(names)}
    summary = {
        "tool": "onnxsal benchmark",
        "command": command,
        "settings": {"metric": metric, "methods": method_names,
                     "fractions": [float(p) for p in fractions], "modes": list(modes),
                     "auc": "trapezoid, dx = 0.1, not normalised", "limit": limit, "seed": seed,
                     "rise": ({"baseline": rise_baseline, "insertion_start": "blur",
                               "step": rise_step or "one image row", "score":
                               "softmax probability of the clean prediction",
                               "auc": "trapezoid over [0, 1]"} if rise else None),
                     "preprocess": preprocess if isinstance(preprocess, (str, type(None)))
                     else str(preprocess), "shard_size": shard_size, "device": device},
        "data": data_desc,
        "models": models_out,
        "results": results,
        "versions": package_versions(),
        "timing": {"seconds_this_run": round(time.time() - t_start, 3),
                   "shards_computed_this_run": computed, "shards_total": len(plan),
                   "executor": executor.describe()},
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", deletion_markdown(summary))
    headers, rows = deletion_csv_rows(summary)
    write_csv(out / "curves.csv", headers, rows)
    plot_deletion_curves(summary, out / "curves.png")
    summary["complete"] = True
    return summary


def _load_shard(path: Path, metric: BlackWhiteDeletion, rise_objs: dict) -> dict | None:
    """A finished shard, or None when it is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
    except Exception:
        return None
    need = {"reference", "errors"} | {f"pred_{m}" for m in metric.modes}
    need |= {f"rise_{kind}_{k}" for kind in rise_objs for k in ("scores", "targets", "errors")}
    if not need <= set(part):
        return None
    return part
