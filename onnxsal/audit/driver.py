"""``onnxsal audit``: one command that runs the checks an auditor needs and writes one report.

:func:`run_audit` reads the data once (brought to the model's input shape), then:

1. model facts: :func:`onnxsal.inspect.summarize` and the engine's gradient source;
2. predictions of every image: accuracy and the confusion matrix when there are labels;
3. maps of every selected method for a sample of images per class (correct and wrong);
4. deletion and every registered metric that applies, by :func:`onnxsal.benchmark.run_benchmark`
   on a class-stratified evaluation set (metrics that need masks or options are skipped with
   the reason; mask metrics run on the audit's own maps when ``masks`` are given);
5. the randomisation sanity checks, by :func:`onnxsal.sanity_run.run_sanity`;
6. the shortcut finder (:mod:`onnxsal.shortcuts`) on a class-stratified set;

and writes ``audit.json`` (every number), ``report.html`` (:mod:`onnxsal.audit.html`),
``assets/`` (the pictures, also embedded in the report), ``benchmark/`` and ``sanity/`` (the
drivers' own outputs). Each part is stored under a key of what it depends on
(:mod:`onnxsal.audit.store`; the benchmark's shards and the sanity steps resume themselves), so
running the same command again after an interruption recomputes only what is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..benchmark import _safe
from ..display import printable
from ..errors import InputError, OptionError
from ..files import atomic_write_bytes, atomic_write_json
from . import figures, sections
from .images import AuditImages
from .store import Parts

DEFAULT_METHODS = ("vanilla", "original", "gradient_x_input", "guided_backprop", "gradcam", "smoothgrad")
DEFAULTS = {"per_class": 2, "max_classes": 20, "eval_images": 32, "sanity_images": 8,
            "max_steps": 4, "shortcut_images": 1000}


def _check(per_class: int, max_classes: int, eval_images: int, sanity_images: int,
           shortcut_images: int, max_steps: int | None) -> None:
    for name, v in (("per-class", per_class), ("max-classes", max_classes),
                    ("eval-images", eval_images), ("sanity-images", sanity_images)):
        if int(v) < 1:
            raise OptionError(f"--{name} must be at least 1, got {v}")
    if int(shortcut_images) < 0:
        raise OptionError(f"--shortcut-images must be >= 0 (0: no shortcut search), got {shortcut_images}")
    if max_steps is not None and int(max_steps) < 1:
        raise OptionError(f"--max-steps must be at least 1, got {max_steps}")


def run_audit(model: str | os.PathLike, data: Any, out: str | os.PathLike, *,
              methods: Sequence[str] | str = DEFAULT_METHODS, masks: Any = None,
              labels: Sequence[str] | str | os.PathLike | None = None,
              per_class: int = DEFAULTS["per_class"], max_classes: int = DEFAULTS["max_classes"],
              limit: int | None = None, eval_images: int = DEFAULTS["eval_images"],
              sanity_images: int = DEFAULTS["sanity_images"],
              max_steps: int | None = DEFAULTS["max_steps"], metrics: Sequence[str] | None = None,
              shortcut_images: int = DEFAULTS["shortcut_images"], shortcut_method: str | None = None,
              shortcut_options: dict | None = None, seed: int = 0, preprocess: Any = None,
              device: str = "auto", threads: int | None = None, output: str | None = None,
              executor: Any = None, progress: Callable[[str], None] | None = None,
              bars: bool = False, command: str | None = None) -> dict:
    """Audit ``model`` on ``data`` and write the report in ``out`` (see the module docstring);
    return the contents of ``audit.json``.

    ``data``: anything :func:`onnxsal.data.load_dataset` reads (a folder of class folders, an
    ``.npz``, image files, a built-in name) or a :class:`~onnxsal.data.Dataset`; ``limit`` keeps
    the first N images. ``masks``: ground truth for the localisation metrics, anything
    :func:`onnxsal.metrics.masks.load_masks` reads, or a bool array [N, H, W]. ``labels``: class
    names (a file or a list; default: the model's metadata, then the data's). ``metrics``:
    registered metric names to consider (default: all). ``executor``: None/"local", "ray" or an
    object from :func:`onnxsal.executors.make_executor` (used by the benchmark and the sanity
    checks).
    """
    from ..benchmark import _parse_methods
    from ..engine import Engine
    from ..inspect import summarize
    from ..methods import resolve
    from ..model import load_model
    from ..preprocess import read_labels
    from ..report import check_output_dir

    out = check_output_dir(out)
    _check(per_class, max_classes, eval_images, sanity_images, shortcut_images, max_steps)
    say = progress or (lambda s: None)
    t_start = time.time()
    timing: dict[str, float] = {}
    method_names = resolve(_parse_methods(methods))
    if masks is not None and not isinstance(masks, np.ndarray):
        head = str(masks).rsplit(":", 1)[0] if ".npz:" in str(masks) else str(masks)
        if not Path(head).exists():
            raise InputError(f"masks {printable(masks)}: no such file or folder")
    if metrics is not None:
        from ..metrics import base as metric_registry

        for n in metrics:
            metric_registry.get(n)  # an unknown name is refused before any work
    names_given = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
    engine = Engine(model, preprocess=preprocess, device=device, threads=threads, output=output)
    ds = AuditImages(data, tuple(engine.input_shape), limit)
    k = int(engine.num_classes)
    if ds.labels is not None and len(ds.labels) and (ds.labels.min() < 0 or ds.labels.max() >= k):
        raise InputError(f"data {ds.source}: labels {int(ds.labels.min())}..{int(ds.labels.max())} are "
                         f"not classes of the model (0..{k - 1})")
    cls_names = sections.class_names(k, names_given, engine.labels, ds.class_names)
    pre_json = engine.preprocess.to_json()
    parts = Parts(out, {"model": engine.model_hash, "preprocess": pre_json, "output": output,
                        "data": ds.fingerprint(), "version": __version__})
    out.mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)

    t = time.time()
    say(f"audit: {len(ds)} images, {k} classes, methods {', '.join(method_names)}")
    summary = summarize(load_model(model), path=str(model), output=output).to_dict()
    facts = {"path": str(model), "name": Path(str(model)).name, "hash": engine.model_hash,
             "summary": summary, "gradient_source": engine.gradient_source,
             "provider": engine.provider, "num_classes": k, "class_names": cls_names,
             "input_shape": [int(d) for d in engine.input_shape],
             "preprocess": pre_json}
    pred = parts.arrays("predictions", {}, lambda: sections.predict(engine, ds.batches()), {"pred", "prob"})
    accuracy = sections.accuracy_section(ds.labels, pred["pred"], cls_names)
    timing["predictions"] = time.time() - t

    t = time.time()
    items, shown = sections.sample_items(ds.labels, pred["pred"], per_class, max_classes)
    sample_idx = np.array(sorted({it["image"] for it in items}), np.int64)
    sample = _sample_section(parts, engine, ds, sample_idx, items, pred, method_names, seed, out, cls_names)
    sample["classes_shown"] = shown
    sample["classes_total"] = int(len(np.unique(pred["pred"] if ds.labels is None else ds.labels)))
    timing["samples"] = time.time() - t
    say(f"maps of {len(sample_idx)} sample images ({timing['samples']:.1f} s)")

    groups = pred["pred"] if ds.labels is None else ds.labels
    eval_idx = sections.stratified(groups, eval_images)
    metric_kind = "accuracy" if ds.labels is not None else "allegiance"
    bench_options = {"metric": metric_kind, "fractions": None, "modes": None,
                     "max_batch_bytes": 256 << 20, "rise_baseline": "black", "rise_step": None}
    plan = sections.metric_plan(_benchmark_options(bench_options), masks is not None, metrics)
    t = time.time()
    bench = _guard("deletion benchmark", lambda: sections.benchmark_section(
        str(model), ds.subset(eval_idx), method_names, metric_kind, plan["benchmark"],
        out / "benchmark", seed=seed, preprocess=preprocess, device=device, threads=threads,
        output=output, executor=executor, progress=bars), say)
    bench["skipped"] = plan["skipped"]
    bench["category"] = plan["category"]
    timing["benchmark"] = time.time() - t
    say(f"deletion and {len(plan['benchmark'])} metrics on {len(eval_idx)} images ({timing['benchmark']:.1f} s)")

    t = time.time()
    localisation = _guard("localisation", lambda: _localisation(
        parts, engine, ds, eval_idx, masks, plan["masks"], method_names, seed), say)
    timing["localisation"] = time.time() - t

    t = time.time()
    sanity_idx = sections.stratified(groups, sanity_images)
    sanity = _guard("sanity checks", lambda: sections.sanity_section(
        str(model), ds.take(sanity_idx), method_names, out / "sanity", seed=seed,
        max_steps=max_steps, preprocess=preprocess, device=device, threads=threads, output=output,
        executor=executor, say=None), say)
    timing["sanity"] = time.time() - t
    say(f"sanity checks on {len(sanity_idx)} images ({timing['sanity']:.1f} s)")

    t = time.time()
    shortcuts = _guard("shortcut search", lambda: _shortcuts(
        parts, engine, ds, groups, pred, method_names, shortcut_images, shortcut_method,
        shortcut_options or {}, seed, out), say)
    timing["shortcuts"] = time.time() - t
    say(f"shortcut search ({timing['shortcuts']:.1f} s)")

    settings = {"methods": method_names, "per_class": per_class, "max_classes": max_classes,
                "limit": limit, "eval_images": int(len(eval_idx)), "sanity_images": int(len(sanity_idx)),
                "max_steps": max_steps, "shortcut_images": shortcut_images, "seed": seed,
                "metrics": None if metrics is None else list(metrics), "device": device,
                "masks": None if masks is None else (str(masks) if not isinstance(masks, np.ndarray)
                                                     else "array")}
    desc = ds.describe()
    report = {"tool": "onnxsal audit", "version": __version__, "command": command,
              "id": parts.base["data"][:8] + "-" + engine.model_hash[:8] + "-"
              + _settings_hash(settings), "model": facts, "data": desc, "settings": settings,
              "predictions": accuracy, "samples": sample, "benchmark": bench,
              "localisation": localisation, "sanity": sanity, "shortcuts": shortcuts,
              "executor": getattr(executor, "name", executor or "local"),
              "timing": {"seconds": round(time.time() - t_start, 2),
                         **{k_: round(v, 2) for k_, v in timing.items()}},
              "parts": {"reused": parts.reused, "computed": parts.computed}}
    from .html import write_report
    from .summary import summarize_audit

    _keep_review(out, report)
    report["summary"] = summarize_audit(report)
    atomic_write_json(out / "audit.json", report)
    write_report(out, report)
    say(f"wrote {out / 'report.html'} ({report['timing']['seconds']:.1f} s)")
    return report


def _guard(what: str, run: Callable[[], dict], say: Callable[[str], None]) -> dict:
    """A section's result, or {"error": one line} when the model or data cannot take it (a
    model without a learnable layer cannot be randomised, a metric refuses the data, ...): the
    other sections go on and the report says why this one is missing."""
    from ..errors import OnnxsalError, OutputError, first_line

    try:
        return run()
    except OutputError:
        raise  # a full disk or a read-only folder stops the audit
    except OnnxsalError as exc:
        say(f"{what}: not run ({first_line(exc)})")
        return {"error": printable(first_line(exc))}


def _keep_review(out: Path, report: dict) -> None:
    """A review folded into this folder before stays in the report (when it is of this audit)."""
    from .review import agreement, load_review

    path = out / "review.json"
    if not path.is_file():
        return
    try:
        rv = load_review(path, report)
    except InputError:
        return  # of another audit: the new report starts without a review
    report["review"] = {**agreement(report, rv["verdicts"]), "reviewer": rv["reviewer"],
                        "verdicts": rv["verdicts"], "file": str(path)}


def _settings_hash(settings: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _benchmark_options(o: dict) -> dict:
    from ..metrics.deletion import FRACTIONS, MODES

    return {**o, "fractions": tuple(FRACTIONS), "modes": tuple(MODES)}


def _sample_section(parts: Parts, engine, ds, idx: np.ndarray, items: list[dict], pred: dict,
                    methods: list[str], seed: int, out: Path, names: list[str]) -> dict:
    """Maps of the sample images (stored), their pictures in assets/, the shown items."""
    need = {f"map/{m}" for m in methods}
    x = ds.take(idx)
    maps = parts.arrays("sample_maps", {"images": idx.tolist(), "methods": methods, "seed": seed},
                        lambda: sections.compute_maps(engine, x, methods, seed), need)
    where = {int(i): j for j, i in enumerate(idx)}
    for j, i in enumerate(idx):
        atomic_write_bytes(out / "assets" / f"image_{int(i)}.png",
                           figures.thumb(figures.image_rgb(x[j])))
        for m in methods:
            rgb = figures.overlay_rgb(x[j], maps[f"map/{m}"][j], bool(maps[f"signed/{m}"]))
            atomic_write_bytes(out / "assets" / f"map_{int(i)}_{_safe(m)}.png", figures.thumb(rgb))
    shown = []
    for it in items:
        i = it["image"]
        shown.append({**it, "name": ds.names[i], "label": None if ds.labels is None else int(ds.labels[i]),
                      "pred": int(pred["pred"][i]), "prob": float(pred["prob"][i]),
                      "image_png": f"assets/image_{i}.png",
                      "maps": {m: {"png": f"assets/map_{i}_{_safe(m)}.png",
                                   "target": int(maps[f"target/{m}"][where[i]])} for m in methods},
                      "class_name": names[it["class"]]})
    return {"methods": methods, "signed": {m: bool(maps[f"signed/{m}"]) for m in methods},
            "items": shown}


def _localisation(parts: Parts, engine, ds, idx: np.ndarray, masks: Any, names: list[str],
                  methods: list[str], seed: int) -> dict:
    if masks is None:
        return {"given": False}
    from ..metrics.masks import load_masks

    hw = tuple(ds.shape[1:])
    if isinstance(masks, np.ndarray):
        all_masks = np.asarray(masks, bool)
        if all_masks.shape != (len(ds),) + hw:
            raise InputError(f"masks have shape {all_masks.shape}; expected {(len(ds),) + hw}")
    else:
        all_masks = load_masks(masks, ds.names, hw)
    m = all_masks[idx]
    x = ds.take(idx)
    maps = parts.arrays("eval_maps", {"images": idx.tolist(), "methods": methods, "seed": seed},
                        lambda: sections.compute_maps(engine, x, methods, seed),
                        {f"map/{k}" for k in methods})
    res = sections.localisation_section(names, x, maps, m, methods, {})
    res["given"] = True
    res["source"] = "array" if isinstance(masks, np.ndarray) else str(masks)
    return res


def _shortcuts(parts: Parts, engine, ds, groups: np.ndarray, pred: dict, methods: list[str],
               n: int, method: str | None, options: dict, seed: int, out: Path) -> dict:
    if n == 0:
        return {"available": False, "reason": "not run (--shortcut-images 0)"}
    method = method or ("vanilla" if "vanilla" in methods else methods[0])
    idx = sections.stratified(groups, n)
    grouped_by = "label" if ds.labels is not None else "prediction"
    fields = {"images": idx.tolist(), "method": method, "seed": seed, "options": options}
    x = ds.take(idx)
    # the maps of each image's class (its label; without labels, its prediction)
    maps = parts.arrays("shortcut_maps", fields,
                        lambda: sections.compute_maps(engine, x, [method], seed, targets=groups[idx]),
                        {f"map/{method}"})
    res = parts.json("shortcuts", fields, lambda: sections.shortcut_section(
        engine, x, groups[idx], maps[f"map/{method}"], num_classes=int(engine.num_classes),
        seed=seed, options=options, method=method, grouped_by=grouped_by))
    if res.get("available"):
        res["image_index"] = idx.tolist()  # the finder's image numbers -> the data set's
        _shortcut_figures(res, x, maps[f"map/{method}"], groups[idx], int(engine.num_classes), out)
    return res


def _shortcut_figures(res: dict, x: np.ndarray, maps: np.ndarray, groups: np.ndarray,
                      num_classes: int, out: Path) -> None:
    """assets/: per finding the class-contrast map with the box, and the examples' sources,
    targets before and after the paste."""
    from ..shortcuts import class_contrast_maps, shortcut_examples

    contrast = class_contrast_maps(maps, groups, num_classes)
    for f in res.get("findings", []):
        c = int(f["class"])
        name = f"shortcut_{c}_contrast.png"
        atomic_write_bytes(out / "assets" / name, figures.thumb(figures.heat_rgb(contrast[c]), f["box"]))
        f["contrast_png"] = f"assets/{name}"
        src, before, after = shortcut_examples(x, f)
        for j, ex in enumerate(f.get("examples", [])):
            for label, arr in (("source", src), ("before", before), ("after", after)):
                name = f"shortcut_{c}_{j}_{label}.png"
                atomic_write_bytes(out / "assets" / name,
                                   figures.thumb(figures.image_rgb(arr[j]), f["box"]))
                ex[f"{label}_png"] = f"assets/{name}"
