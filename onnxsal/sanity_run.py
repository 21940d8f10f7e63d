"""The model-parameter randomisation test of Adebayo et al. (2018) on ONNX weights.

:func:`run_sanity` answers, for one model and several saliency methods: does the method's map
depend on what the model learned? For each step of cascading (top layer first, then the next
one down as well, ...) or independent (one layer at a time) randomisation
(:mod:`onnxsal.metrics.sanity`) it builds the randomised model, runs it in a fresh
:class:`~onnxsal.engine.Engine`, re-predicts the explained class, computes every method's maps
and compares them with the trained model's maps (:mod:`onnxsal.metrics.similarity`); each
similarity is reported as mean and std over images per step, method and metric.

Step 0 ("trained") recomputes the maps on an untouched copy of the model: it is the
self-similarity baseline. Methods with a ``seed`` option (SmoothGrad, RISE, LIME, ...) run it
with seed + 1, so their baseline measures their own noise; deterministic methods give 1.

Pass/fail rule (:data:`onnxsal.sanity_report.RULE`): a method **passes** when its mean Spearman rank correlation of the
absolute maps (``spearman_abs``) at the end of the test (cascading: every layer randomised;
independent: the layer whose randomisation lowers it most) is below ``threshold`` (0.5) *and*
at least ``margin`` (0.3) below its step-0 self-similarity. Otherwise it **fails**: its maps
stay similar to the trained model's, so they do not reflect what the model learned (or, when
the baseline itself is low, the method's own noise hides any dependence on the model).
Lower similarity is better here (the metric's direction is "lower").

Per-step rule (:data:`onnxsal.sanity_report.STEP_RULE`): the end-point rule cannot see a
method that ignores the top layers and changes only once the lowest ones are randomised
(guided backprop). So each step also gets a verdict: the similarity *dropped* there when the
mean ``spearman_abs`` is at least ``step_margin`` (0.02) below the step-0 self-similarity and a
one-sided Wilcoxon signed-rank test over the images (per-image self-similarity minus
similarity) gives p < ``alpha`` (0.05). The **top-layer verdict** passes a method when the
similarity dropped at each of the first ``top_steps`` (1) steps, i.e. as soon as the top
layer is randomised.

Outputs in ``out``: ``sanity.json`` (settings, layers, per-step mean/std/n per method and
metric, verdicts), ``sanity.md``, ``cascading.png`` (or ``independent.png``: similarity against
the randomisation step, one line per method, one panel per metric), ``maps_grid.png`` (rows
methods, columns steps, for one image) and ``steps/step_NNN.npz`` (per-image similarities and
the grid image's maps). Every file is written atomically; a run that stops resumes from the
step files whose fingerprint matches the settings.

The work is a list of :class:`SanityTask` (the trained model's maps, then one task per step):
plain values that an executor (:mod:`onnxsal.executors`: this process, or Ray workers that
each keep the trained model, sent once as bytes) computes; the driver alone writes the step
files and the results, the same way for every executor.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from . import __version__
from .errors import InputError, ModelError, OptionError
from .metrics import similarity as sim
from .metrics.randomisation import cascading_steps, independent_steps, pick_steps, randomize
from .metrics.sanity import Layer, find_layers
from .model import content_hash, load_model
from .runs import EngineSpec, executor_session, load_arrays, model_payload, run_key, save_arrays
from .sanity_report import DIRECTION, RULE, STEP_RULE, markdown, plot_curves, plot_grid, step_verdicts, verdict

MODES = ("cascading", "independent")

MethodFn = Callable[..., Any]


@dataclass
class Step:
    index: int  # 0 = trained (no layer randomised)
    label: str  # the layer randomised last (cascading) or alone (independent)
    layers: list[Layer]

    @property
    def names(self) -> list[str]:
        return [L.name for L in self.layers]


def _method_callable(name: str, given: MethodFn | None) -> MethodFn:
    if given is not None:
        return given
    from . import methods

    return methods.get(name)


def _canonical(names: Sequence[str] | Mapping[str, MethodFn]) -> dict[str, MethodFn | None]:
    if isinstance(names, Mapping):
        return dict(names)
    from . import methods

    return {n: None for n in methods.resolve(list(names))}


def comparable(result: Any, hw: tuple[int, int]) -> np.ndarray:
    """The array the similarities compare, from a method's result: the per-channel attribution
    ``raw`` [N, C, H, W] when the method has one at image size, else its 2-D maps [N, H, W]."""
    raw = getattr(result, "raw", None)
    if raw is not None and np.ndim(raw) == 4 and tuple(np.shape(raw)[2:]) == tuple(hw):
        return np.asarray(raw, np.float32)
    arr = np.asarray(getattr(result, "maps", result), np.float32)
    if arr.ndim not in (3, 4) or tuple(arr.shape[-2:]) != tuple(hw):
        raise InputError(f"a method returned maps of shape {arr.shape}; expected [N, H, W] or "
                         f"[N, C, H, W] with H x W = {hw[0]} x {hw[1]}")
    return arr


def _has_seed(fn: Any) -> bool:
    return "seed" in getattr(fn, "defaults", {})


def _compute_maps(engine, x: np.ndarray, targets: np.ndarray, methods: dict[str, MethodFn],
                  options: dict[str, dict], seed_shift: int = 0) -> dict[str, np.ndarray]:
    hw = tuple(x.shape[2:])
    out = {}
    for name, fn in methods.items():
        opts = dict(options.get(name, {}))
        if seed_shift and _has_seed(fn):
            opts["seed"] = int(opts.get("seed", fn.defaults["seed"]) or 0) + seed_shift
        out[name] = comparable(fn(engine, x, targets, **opts), hw)
    return out


def _similarities(orig: np.ndarray, new: np.ndarray, hog_correlation: str) -> dict[str, np.ndarray]:
    res = {m: np.full(len(orig), np.nan) for m in sim.METRICS}
    for i in range(len(orig)):
        for m, v in sim.compare(orig[i], new[i], hog_correlation).items():
            res[m][i] = v
    return res


def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if len(ok) else None,
            "std": float(ok.std()) if len(ok) else None,
            "n": int(len(ok)), "n_nan": int(len(v) - len(ok)),
            "nan_images": [int(i) for i in np.flatnonzero(~np.isfinite(v))][:50]}


def _save_step(path: Path, fp: str, targets: np.ndarray, agree: float,
               sims: dict[str, dict[str, np.ndarray]], grid: dict[str, np.ndarray]) -> None:
    arrays = {"fingerprint": np.array(fp), "targets": targets, "agreement": np.array(agree)}
    for m, d in sims.items():
        for k, v in d.items():
            arrays[f"sim/{m}/{k}"] = v
    for m, v in grid.items():
        arrays[f"grid/{m}"] = v
    save_arrays(path, arrays)


def _load_step(path: Path, fp: str, methods: Sequence[str]):
    """A finished step, or None when it is missing, partial or from other settings."""
    need = {"fingerprint", "targets", "agreement"} | {f"grid/{m}" for m in methods}
    need |= {f"sim/{m}/{k}" for m in methods for k in sim.METRICS}
    z = load_arrays(path, need)
    if z is None or str(z["fingerprint"]) != fp:
        return None
    sims = {m: {k: z[f"sim/{m}/{k}"] for k in sim.METRICS} for m in methods}
    grid = {m: z[f"grid/{m}"] for m in methods}
    return z["targets"], float(z["agreement"]), sims, grid


@dataclass(frozen=True)
class SanitySpec(EngineSpec):
    """How a worker gets the trained model and builds engines (the fields of
    :class:`onnxsal.benchmark.EngineSpec`); ``factory(model_proto)`` replaces
    :class:`onnxsal.engine.Engine` (tests) and is applied to each randomised model."""

    def build(self, payload: Any, default_threads: int | None = None) -> "SanityModel":
        """The context of this model's tasks, from serialized ONNX bytes or a ModelProto."""
        source = onnx.load_from_string(bytes(payload)) if isinstance(payload, (bytes, bytearray)) \
            else payload
        if content_hash(source) != self.model_hash:
            raise ModelError("the worker's copy of the model differs from the driver's")
        factory = self.factory
        if factory is None:
            from .engine import Engine

            threads = self.threads if self.threads is not None else default_threads

            def factory(m: onnx.ModelProto):
                return Engine(m, preprocess=self.preprocess, device=self.device,
                              output=self.output, threads=threads, use_disk_cache=False)
        return SanityModel(source, factory)


class SanityModel:
    """What a sanity task runs with: the trained model, how to build an engine, and the
    trained model's engine (built on first use)."""

    def __init__(self, source: onnx.ModelProto, factory: Callable[[onnx.ModelProto], Any],
                 trained: Any = None) -> None:
        self.source = source
        self._factory = factory
        self._trained = trained
        self.provider = getattr(trained, "provider", None)  # of the last engine built

    def engine(self, model: onnx.ModelProto) -> Any:
        eng = self._factory(model)
        self.provider = getattr(eng, "provider", None)
        return eng

    def trained(self) -> Any:
        if self._trained is None:
            self._trained = self.engine(self.source)
        return self._trained


@dataclass
class SanityTask:
    """One unit of a sanity check: the trained model's maps (``step`` None), or one
    randomisation step compared with them (``original``, ``targets0``)."""

    engine: SanitySpec
    images: np.ndarray
    methods: dict[str, MethodFn | None]  # None: the method of that name in onnxsal.methods
    options: dict[str, dict]
    seed: int
    hog_correlation: str
    grid_image: int
    step: Step | None = None
    original: dict[str, np.ndarray] | None = None
    targets0: np.ndarray | None = None
    label: str = ""
    model_index: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return self.label or ("trained model" if self.step is None else f"step {self.step.index}")

    def iter_parts(self, ctx: SanityModel) -> Iterator[tuple[str, dict]]:
        """("trained", {targets, maps}) or ("step", {targets, agree, sims, grid})."""
        fns = {n: _method_callable(n, f) for n, f in self.methods.items()}
        x = self.images
        if self.step is None:
            eng = ctx.trained()
            t0 = np.asarray(eng.predict(x), np.int64)
            yield "trained", {"targets": t0, "maps": _compute_maps(eng, x, t0, fns, self.options)}
            return
        rmodel = randomize(ctx.source, self.step.layers, seed=self.seed)
        reng = ctx.engine(rmodel)
        t = np.asarray(reng.predict(x), np.int64)
        maps = _compute_maps(reng, x, t, fns, self.options,
                             seed_shift=1 if self.step.index == 0 else 0)
        sims = {m: _similarities(self.original[m], maps[m], self.hog_correlation) for m in fns}
        grid = {m: maps[m][self.grid_image] for m in fns}
        yield "step", {"targets": t, "agree": float(np.mean(t == self.targets0)),
                       "sims": sims, "grid": grid}


def run_sanity(model: str | os.PathLike | onnx.ModelProto, images: Any,
               methods: Sequence[str] | Mapping[str, MethodFn], out: str | os.PathLike, *,
               mode: str = "cascading", seed: int = 0, preprocess=None, device: str = "auto",
               threads: int | None = None, output: str | None = None,
               max_steps: int | None = None, method_options: Mapping[str, dict] | None = None,
               threshold: float = 0.5, margin: float = 0.3, step_margin: float = 0.02,
               alpha: float = 0.05, top_steps: int = 1, hog_correlation: str = "pearson",
               grid_image: int = 0, limit: int | None = None, data: dict | None = None,
               engine_factory: Callable[[onnx.ModelProto], Any] | None = None,
               progress: Callable[[str], None] | None = None, plots: bool = True,
               executor: Any = None) -> dict:
    """Run the test and write its results in ``out`` (see the module docstring); return the
    contents of ``sanity.json``.

    ``methods``: names from :mod:`onnxsal.methods` or ``{name: callable}`` with the method call
    shape ``fn(engine, images, targets, **options)`` returning ``Maps`` or an array.
    ``images``: float32 [N, C, H, W] in [0, 1], or anything :func:`onnxsal.data.load_dataset`
    reads (a folder, an .npz, a built-in name), brought to the model's input shape; ``limit``
    keeps the first N images. ``max_steps`` spreads at most that many
    randomisation steps over the layers (the last, full randomisation always included).
    ``executor``: None or "local" (this process), "ray", or an object from
    :func:`onnxsal.executors.make_executor`; the result files do not depend on it.
    ``step_margin``, ``alpha``, ``top_steps``: the per-step rule
    (:data:`onnxsal.sanity_report.STEP_RULE`; with ``max_steps`` the first steps are the
    first ones picked).
    """
    from .report import check_output_dir

    check_output_dir(out)  # before any work
    _check_options(mode, hog_correlation, seed, max_steps)
    if not 0 < alpha < 1 or top_steps < 1:
        raise OptionError(f"alpha must be in (0, 1) and top steps >= 1, got {alpha}, {top_steps}")
    with executor_session(executor, device) as ex:
        return _run_sanity(model, images, methods, out, mode=mode, seed=seed,
                           preprocess=preprocess, device=device, threads=threads, output=output,
                           max_steps=max_steps, method_options=method_options,
                           threshold=threshold, margin=margin,
                           step_rule=(float(step_margin), float(alpha), int(top_steps)),
                           hog_correlation=hog_correlation, grid_image=grid_image, limit=limit, data=data,
                           engine_factory=engine_factory, progress=progress, plots=plots,
                           executor=ex)


def _check_options(mode: str, hog_correlation: str, seed: int, max_steps: int | None) -> None:
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
    if hog_correlation not in ("pearson", "spearman"):
        raise OptionError(f"hog correlation must be 'pearson' or 'spearman', got '{hog_correlation}'")
    if seed < 0:
        raise OptionError(f"seed must be >= 0, got {seed}")
    if max_steps is not None and max_steps < 1:
        raise OptionError(f"max steps must be >= 1, got {max_steps}")


def _images(images: Any, engine: Any, limit: int | None, data: dict | None,
            grid_image: int) -> tuple[np.ndarray, dict | None]:
    """(float32 [N, C, H, W] images in the model's input shape, their description)."""
    if not isinstance(images, np.ndarray):
        from .data import load_dataset

        ds = load_dataset(images, shape=tuple(engine.input_shape), limit=limit)
        data = data or ds.describe()
        images = ds.images
    elif limit is not None:
        images = images[:limit]
    x = np.asarray(images)
    if x.ndim != 4 or len(x) == 0:
        raise InputError(f"images must be a non-empty [N, C, H, W] batch, got shape {x.shape}")
    if tuple(x.shape[1:]) != tuple(engine.input_shape):
        raise InputError(f"images have shape {tuple(x.shape)}; the model takes [N, "
                         f"{', '.join(map(str, engine.input_shape))}]")
    if not 0 <= grid_image < len(x):
        raise OptionError(f"grid image {grid_image} is outside 0..{len(x) - 1}")
    return np.ascontiguousarray(x, np.float32), data


def _run_sanity(model, images, methods, out, *, mode, seed, preprocess, device, threads, output,
                max_steps, method_options, threshold, margin, step_rule, hog_correlation, grid_image,
                limit, data, engine_factory, progress, plots, executor) -> dict:
    """The body of :func:`run_sanity` between opening and closing the executor."""
    from .report import atomic_write_json, atomic_write_text

    say = progress or (lambda s: None)
    out = Path(out)
    source = model if isinstance(model, onnx.ModelProto) else load_model(model)
    model_name = "<in memory>" if isinstance(model, onnx.ModelProto) else str(model)
    chosen = _canonical(methods)
    fns = {n: _method_callable(n, f) for n, f in chosen.items()}
    options = {k: dict(v) for k, v in (method_options or {}).items()}
    unknown = sorted(set(options) - set(fns))
    if unknown:
        raise OptionError(f"options given for methods not selected: {', '.join(unknown)}")

    custom_factory = engine_factory
    if engine_factory is None:
        from .engine import Engine

        # remote workers compute; the driver (maybe without a GPU) only plans, on the CPU
        plan_device = device if executor.in_process else "cpu"

        def engine_factory(m: onnx.ModelProto):
            return Engine(m, preprocess=preprocess, device=plan_device, output=output,
                          threads=threads, use_disk_cache=False)

    engine = engine_factory(source)
    x, data = _images(images, engine, limit, data, grid_image)
    logits_name = engine.logits_spec.tensor if hasattr(engine, "logits_spec") else None
    layers = find_layers(source, logits_name)
    if not layers:
        raise InputError("the model has no learnable layer to randomise (Conv, Gemm, MatMul with "
                         "a constant, normalisation scales)")
    all_steps = cascading_steps(layers) if mode == "cascading" else independent_steps(layers)
    picked = pick_steps(len(all_steps), max_steps)
    steps = [Step(0, "trained", [])] + [
        Step(k + 1, all_steps[k][-1].name, list(all_steps[k])) for k in picked]

    model_hash = content_hash(source)
    data_hash = hashlib.sha256(x.tobytes() + repr(x.shape).encode()).hexdigest()
    settings = {"model_hash": model_hash, "data_hash": data_hash, "mode": mode, "seed": seed,
                "methods": list(fns), "method_options": options, "hog_correlation": hog_correlation,
                "preprocess": getattr(getattr(engine, "preprocess", None), "to_json", lambda: None)(),
                "output": output, "version": __version__, "grid_image": grid_image,
                "layers": [L.name for L in layers]}
    step_dir = out / "steps"
    step_dir.mkdir(parents=True, exist_ok=True)

    spec = SanitySpec(key=run_key(settings)[0], model_hash=model_hash,
                      preprocess=preprocess, device=device, threads=threads, output=output,
                      factory=custom_factory)
    contexts = [SanityModel(source, engine_factory, trained=engine)]

    def payload(i: int) -> Any:
        return model_payload(source, custom_factory)

    def task(**kw) -> SanityTask:
        return SanityTask(engine=spec, images=x, methods=chosen, options=options, seed=seed,
                          hog_correlation=hog_correlation, grid_image=grid_image, **kw)

    # the trained model's maps: what every step is compared with
    say(f"trained model: {len(x)} images, {len(layers)} layers, {len(steps) - 1} {mode} steps")
    got0: dict = {}
    executor.run([task(label="trained model")], contexts=contexts, payload=payload,
                 deliver=lambda t, name, part: got0.update(part))
    targets0, original = got0["targets"], got0["maps"]

    done: dict[int, tuple] = {}
    todo = []
    for j, step in enumerate(steps):
        where = f"step {j}/{len(steps) - 1}" + (f" ({mode} step {step.index} of {len(all_steps)})"
                                                 if step.index != j else "")
        fp = run_key({**settings, "step": step.index, "step_layers": step.names})[0]
        path = step_dir / f"step_{step.index:03d}.npz"
        got = _load_step(path, fp, list(fns))
        if got is None:
            todo.append(task(step=step, original=original, targets0=targets0,
                             label=f"{where}: {step.label}"
                             + (f" ({len(step.layers)} layers randomised)" if step.layers else ""),
                             files={"step": str(path), "fingerprint": fp}))
        else:
            say(f"{where}: {step.label} (done before, reused)")
            done[step.index] = got

    def deliver(t: SanityTask, name: str, part: dict) -> None:
        _save_step(Path(t.files["step"]), t.files["fingerprint"], part["targets"], part["agree"],
                   part["sims"], part["grid"])
        done[t.step.index] = (part["targets"], part["agree"], part["sims"], part["grid"])
        say(t.label)

    executor.run(todo, contexts=contexts, payload=payload, deliver=deliver,
                 status=None)
    results = []
    grids = {}
    for step in steps:
        _, agree, sims, grid = done[step.index]
        grids[step.index] = grid
        results.append({
            "step": step.index, "label": step.label, "layers_randomised": len(step.layers),
            "layers": step.names, "class_agreement": agree,
            "methods": {m: {k: _summary(sims[m][k]) for k in sim.METRICS} for m in fns},
        })

    verdicts = {m: verdict(results, m, mode, threshold, margin) for m in fns}
    step_margin, alpha, top_steps = step_rule
    per_step = {m: step_verdicts(done[0][2][m]["spearman_abs"],
                                 [(st.index, st.label, done[st.index][2][m]["spearman_abs"])
                                  for st in steps[1:]], step_margin, alpha, top_steps) for m in fns}
    report = {
        "model": model_name, "model_hash": model_hash, "data": data or {"count": len(x)},
        "images": len(x), "mode": mode, "seed": seed, "methods": list(fns),
        "method_options": options, "hog_correlation": hog_correlation,
        "normalisation": {"abs": "sum |m| over channels, (s - min) / (p99 - min) clipped to [0, 1]",
                          "signed": "sum over channels / p99(|s|), clipped to [-1, 1]"},
        "rule": RULE.format(threshold=threshold, margin=margin),
        "threshold": threshold, "margin": margin, "direction": DIRECTION,
        "provider": executor.providers.get(0, getattr(engine, "provider", None)),
        "layers": [L.to_dict() for L in layers],
        "steps": results, "verdicts": verdicts,
        "step_rule": STEP_RULE.format(step_margin=step_margin, alpha=alpha, top_steps=top_steps),
        "step_margin": step_margin, "alpha": alpha, "top_steps": top_steps,
        "step_verdicts": per_step, "version": __version__,
    }
    atomic_write_json(out / "sanity.json", report)
    atomic_write_text(out / "sanity.md", markdown(report))
    if plots:
        from .overlays import draw_figures

        failed = draw_figures([
            (f"{mode}.png", lambda: plot_curves(report, out / f"{mode}.png")),
            ("maps_grid.png", lambda: plot_grid(report, x[grid_image], original, grids,
                                                out / "maps_grid.png", grid_image))])
        if failed:  # the data are written; the report says which figures are missing
            report["figure_failures"] = [{"name": n, "error": e} for n, e in failed]
            atomic_write_json(out / "sanity.json", report)
    say(f"wrote {out / 'sanity.json'}")
    return report


def compare_models(reference, other, images: np.ndarray,
                   methods: Sequence[str] | Mapping[str, MethodFn], *, preprocess=None,
                   device: str = "auto", threads: int | None = None,
                   method_options: Mapping[str, dict] | None = None,
                   hog_correlation: str = "pearson",
                   engine_factory: Callable[[Any], Any] | None = None) -> dict:
    """The data randomisation test's comparison: each method's maps from ``reference`` (e.g.
    the model trained on true labels) against ``other`` (the same architecture trained on
    permuted labels), each model explaining its own predicted class.

    Returns {"methods": {name: {metric: summary}}, "per_image": {name: {metric: [..]}},
    "class_agreement": fraction, "maps": {"reference": {name: arr}, "other": {name: arr}}}.
    """
    if engine_factory is None:
        from .engine import Engine

        def engine_factory(m):
            return Engine(m, preprocess=preprocess, device=device, threads=threads,
                          use_disk_cache=False)

    fns = {n: _method_callable(n, f) for n, f in _canonical(methods).items()}
    options = {k: dict(v) for k, v in (method_options or {}).items()}
    x = np.ascontiguousarray(images, np.float32)
    maps, targets = {}, {}
    for key, model in (("reference", reference), ("other", other)):
        eng = engine_factory(model)
        targets[key] = np.asarray(eng.predict(x), np.int64)
        maps[key] = _compute_maps(eng, x, targets[key], fns, options)
    sims = {m: _similarities(maps["reference"][m], maps["other"][m], hog_correlation) for m in fns}
    return {"methods": {m: {k: _summary(sims[m][k]) for k in sim.METRICS} for m in fns},
            "per_image": {m: {k: sims[m][k].tolist() for k in sim.METRICS} for m in fns},
            "class_agreement": float(np.mean(targets["reference"] == targets["other"])),
            "targets": {k: v.tolist() for k, v in targets.items()}, "maps": maps}


# -- reports ----------------------------------------------------------------------------------


__all__ = ["run_sanity", "compare_models", "comparable", "MODES"]
