"""The sections of an audit, each a function of the engine, the data and the settings that
returns JSON-ready results (the pictures are made by :mod:`onnxsal.audit.html` from the arrays
stored in the parts). The heavy work is done by the existing drivers:
:func:`onnxsal.benchmark.run_benchmark` (deletion and the registered metrics),
:func:`onnxsal.sanity_run.run_sanity` (the randomisation checks) and
:func:`onnxsal.shortcuts.find_shortcuts`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import OptionError, first_line
from ..metrics import base as metric_registry
from ..metrics.deletion import BlackWhiteDeletion

# a metric's family, from its module (a metric class may declare ``category`` itself)
MODULE_CATEGORY = {"deletion": "faithfulness", "rise": "faithfulness", "faithfulness": "faithfulness",
                   "road_irof": "faithfulness", "complexity": "complexity", "axiomatic": "axiomatic",
                   "localisation": "localisation", "randomisation_logit": "randomisation"}


def category(cls: type) -> str:
    """The family of a metric class: its ``category`` attribute, else its module's (modules
    whose name says robust/robustness are robustness metrics)."""
    given = getattr(cls, "category", None)
    if isinstance(given, str) and given:
        return given
    last = cls.__module__.rsplit(".", 1)[-1]
    if "robust" in last:
        return "robustness"
    return MODULE_CATEGORY.get(last, last)


def stratified(groups: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` indices taken round-robin over the groups (classes) in index order, so a
    sorted data set still gives every class its share; sorted."""
    groups = np.asarray(groups)
    queues = [list(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop(0)))
    return np.array(sorted(out), np.int64)


def class_names(num_classes: int, *candidates: Sequence[str] | None) -> list[str]:
    """The first candidate list of the right length, else "0", "1", ..."""
    for c in candidates:
        if c is not None and len(c) == num_classes:
            return [str(v) for v in c]
    return [str(i) for i in range(num_classes)]


# -- predictions ---------------------------------------------------------------------------


def predict(engine, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Predicted class and its softmax probability per image, batch by batch."""
    from ..numeric import softmax

    preds, probs = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for x in batches:
        z = np.asarray(engine.logits(x), np.float64)
        p = softmax(z, np.float64)
        preds.append(z.argmax(axis=1))
        probs.append(p.max(axis=1))
    return {"pred": np.concatenate(preds).astype(np.int64),
            "prob": np.concatenate(probs).astype(np.float32)}


def accuracy_section(labels: np.ndarray | None, pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, the confusion matrix (rows: true class, columns: predicted) and per class."""
    k = len(names)
    if labels is None:
        counts = np.bincount(pred, minlength=k)
        return {"labels": False, "images": int(len(pred)), "accuracy": None,
                "predicted_counts": counts.tolist()}
    cm = np.bincount(np.asarray(labels, np.int64) * k + pred, minlength=k * k).reshape(k, k)
    per = []
    for c in range(k):
        n = int(cm[c].sum())
        per.append({"class": c, "name": names[c], "images": n, "correct": int(cm[c, c]),
                    "accuracy": float(cm[c, c] / n) if n else None})
    off = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j]]
    top = [{"true": i, "predicted": j, "images": n} for n, i, j in sorted(off, key=lambda t: (-t[0], t[1], t[2]))[:10]]
    return {"labels": True, "images": int(len(pred)), "correct": int(np.trace(cm)),
            "accuracy": float(np.trace(cm) / max(1, len(pred))), "confusion": cm.tolist(),
            "per_class": per, "top_confusions": top}


def sample_items(labels: np.ndarray | None, pred: np.ndarray, per_class: int,
                 max_classes: int) -> tuple[list[dict], list[int]]:
    """The images shown with their maps: per class, up to ``per_class`` correct and up to
    ``per_class`` wrong ones (by true label; without labels, by predicted class). Returns the
    items and the classes shown (at most ``max_classes``: those with the most errors, then
    the most images, in class order)."""
    group = pred if labels is None else labels
    classes = sorted(int(c) for c in np.unique(group))
    if len(classes) > max_classes:
        wrong = {c: 0 if labels is None else int(((labels == c) & (pred != c)).sum()) for c in classes}
        count = {c: int((group == c).sum()) for c in classes}
        classes = sorted(sorted(classes, key=lambda c: (-wrong[c], -count[c], c))[:max_classes])
    items = []
    for c in classes:
        idx = np.flatnonzero(group == c)
        if labels is None:
            items += [{"image": int(i), "class": c, "correct": None} for i in idx[:per_class]]
            continue
        ok = idx[pred[idx] == c][:per_class]
        bad = idx[pred[idx] != c][:per_class]
        items += [{"image": int(i), "class": c, "correct": True} for i in ok]
        items += [{"image": int(i), "class": c, "correct": False} for i in bad]
    return items, classes


def compute_maps(engine, images: np.ndarray, methods: list[str], seed: int,
                 targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{"map/<method>": float32 [N, H, W], "signed/<method>": bool, "target/<method>": [N]} from
    :func:`onnxsal.methods.compute` (the explained class: ``targets``, default the predicted)."""
    from .. import methods as registry

    opts = {"seed": seed} if any("seed" in registry.get(m).defaults for m in methods) else {}
    out: dict[str, np.ndarray] = {}
    res = registry.compute(engine, images, list(methods), targets=targets, **opts)
    for m, r in res.items():
        out[f"map/{m}"] = np.asarray(r.maps, np.float32)
        out[f"signed/{m}"] = np.array(bool(r.signed))
        out[f"target/{m}"] = np.asarray(r.targets, np.int64)
    return out


# -- metrics -------------------------------------------------------------------------------


def metric_plan(options: dict, masks: bool, wanted: Sequence[str] | None) -> dict:
    """Which registered metrics the audit runs: ``benchmark`` (given the benchmark's options,
    run by it), ``masks`` (need ground-truth masks, which are given: computed on the audit's
    maps) and ``skipped`` ({metric, reason}). ``wanted``: None for all, else the names."""
    names = metric_registry.names()
    if wanted is not None:
        for n in wanted:
            metric_registry.get(n)  # an unknown name is refused, naming the choices
        names = [n for n in names if n in wanted]
    plan: dict[str, list] = {"benchmark": [], "masks": [], "skipped": [], "category": {}}
    for n in names:
        cls = metric_registry.get(n)
        plan["category"][n] = category(cls)
        if n == BlackWhiteDeletion.name:
            continue  # always run: the benchmark's own metric
        try:
            cls.from_options(dict(options))
            plan["benchmark"].append(n)
            continue
        except OptionError as exc:
            reason = first_line(exc)
        except Exception as exc:  # a plugin's metric that cannot be built from options
            reason = f"cannot be built from options ({type(exc).__name__}: {first_line(exc)})"
        if _takes_masks(cls, options):
            if masks:
                plan["masks"].append(n)
                continue
            reason = "needs ground-truth masks (give --masks)"
        plan["skipped"].append({"metric": n, "reason": reason})
    plan["category"][BlackWhiteDeletion.name] = category(BlackWhiteDeletion)
    return plan


def _takes_masks(cls: type, options: dict) -> bool:
    try:
        cls.from_options({**options, "masks": np.zeros((1, 1, 1), bool)})
        return True
    except Exception:
        return False


def benchmark_section(model: str, dataset, methods: list[str], metric: str, extra: list[str],
                      out: Path, *, seed: int, preprocess, device: str, threads: int | None,
                      output: str | None, executor: Any, progress: bool) -> dict:
    """Run :func:`onnxsal.benchmark.run_benchmark` in ``out`` (resumable from its shards) and
    keep what the report shows."""
    from ..benchmark import run_benchmark

    res = run_benchmark([model], dataset, methods, metric, None, out, seed=seed,
                        preprocess=preprocess, device=device, threads=threads, output=output,
                        metrics_extra=extra, executor=executor, progress=progress,
                        shard_size=max(1, len(dataset)))
    rows = []
    for r in res["results"]:
        rows.append({"method": r["method"], "auc": r.get("auc", {}), "curves": r.get("curves", {}),
                     "metrics": {k: {"value": v.get("value"), "direction": v.get("direction"),
                                     "valid_images": v.get("valid_images")}
                                 for k, v in (r.get("metrics") or {}).items()}})
    return {"metric": metric, "images": res["data"]["count"], "rows": rows,
            "clean": res["models"][0]["clean"], "fractions": res["settings"]["fractions"],
            "modes": res["settings"]["modes"], "auc": res["settings"]["auc"],
            "folder": out.name, "curves_png": "curves.png" if (out / "curves.png").is_file() else None}


def sanity_section(model: str, images: np.ndarray, methods: list[str], out: Path, *, seed: int,
                   max_steps: int | None, preprocess, device: str, threads: int | None,
                   output: str | None, executor: Any, say) -> dict:
    """Run :func:`onnxsal.sanity_run.run_sanity` in ``out`` (resumable from its step files)."""
    from ..sanity_run import run_sanity

    rep = run_sanity(model, images, methods, out, mode="cascading", seed=seed,
                     preprocess=preprocess, device=device, threads=threads, output=output,
                     max_steps=max_steps, progress=say, executor=executor)
    steps = [{"step": s["step"], "label": s["label"], "layers_randomised": s["layers_randomised"],
              "class_agreement": s["class_agreement"],
              "spearman_abs": {m: s["methods"][m]["spearman_abs"]["mean"] for m in rep["methods"]}}
             for s in rep["steps"]]
    return {"images": rep["images"], "mode": rep["mode"], "rule": rep["rule"],
            "verdicts": rep["verdicts"], "steps": steps, "folder": out.name,
            "step_rule": rep.get("step_rule"),
            "step_verdicts": {m: {"passes": v["passes"], "first_drop": v["first_drop"],
                                  "reason": v["reason"]}
                              for m, v in (rep.get("step_verdicts") or {}).items()},
            "figures": [f for f in ("cascading.png", "maps_grid.png") if (out / f).is_file()]}


def localisation_section(names: list[str], images: np.ndarray, maps: dict[str, np.ndarray],
                         masks: np.ndarray, methods: list[str], options: dict) -> dict:
    """The mask metrics on the audit's maps: {metric: {method: {value, valid_images}}}."""
    out: dict[str, dict] = {}
    for n in names:
        cls = metric_registry.get(n)
        m = cls.from_options({**options, "masks": masks})
        out[n] = {"direction": cls.direction, "methods": {}}
        for meth in methods:
            res = m(engine_unused, images, maps[f"map/{meth}"])
            v = res.get("value") if isinstance(res, dict) else None
            out[n]["methods"][meth] = {
                "value": None if v is None or not math.isfinite(v) else float(v),
                "valid_images": int(res.get("valid_images", 0)) if isinstance(res, dict) else 0}
    return {"images": int(len(masks)), "mask_fraction": float(masks.mean()), "metrics": out}


def engine_unused(x: np.ndarray) -> np.ndarray:
    """The model callable given to the mask metrics, which do not run the model."""
    raise AssertionError("a localisation metric ran the model")


# -- shortcuts -----------------------------------------------------------------------------


def shortcut_section(engine, images: np.ndarray, groups: np.ndarray, maps: np.ndarray, *,
                     num_classes: int, seed: int, options: dict, method: str,
                     grouped_by: str) -> dict:
    """:func:`onnxsal.shortcuts.find_shortcuts` on the shortcut images (JSON-ready)."""
    from ..shortcuts import find_shortcuts

    res = find_shortcuts(engine.logits, images, groups, maps, num_classes=num_classes, seed=seed,
                         **options)
    return {"available": True, "method": method, "grouped_by": grouped_by, **res}
