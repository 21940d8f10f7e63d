"""Are two ONNX models the same model, and where do they differ?

:func:`compare_models` runs two classifiers that share an input space (after each one's own
preprocessing) and a class count on the same images, and reports:

* prediction agreement: top-1 agreement, max and mean absolute logit difference, max absolute
  probability difference, the images whose top-1 differs, and each model's accuracy when the
  data carry labels;
* per saliency method, map agreement on the same images and the same targets (model A's
  predicted classes, so that both maps explain the same class): per image the Spearman rank
  correlation of the two maps (:func:`onnxsal.metrics.similarity.spearman`), the SSIM of their
  absolute-normalised versions (:func:`~onnxsal.metrics.similarity.ssim`) and the max absolute
  difference of the maps (also relative to the largest |value| of model A's map); aggregated as
  mean/min and the image where the maps differ most.

The verdict calls the models "the same" when every top-1 agrees, the largest logit difference is
at most ``atol + rtol * (logit range of A)`` and every map pair has Spearman >= ``min_spearman``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .display import printable
from .errors import OnnxsalError, OptionError
from .files import atomic_write_json, atomic_write_text
from .numeric import softmax
from .report import check_output_dir

DEFAULT_METHODS = ("vanilla", "gradient_x_input", "integrated_gradients", "gradcam", "original")


def _engine(model, preprocess, device, threads):
    from .engine import Engine

    if hasattr(model, "logits") and hasattr(model, "input_shape"):
        return model
    return Engine(model, preprocess=preprocess, device=device, threads=threads)


def map_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Per-image agreement of two stacks of maps [N, H, W] and its summary."""
    from .metrics.similarity import normalize_abs, spearman, ssim

    n = len(a)
    rho = np.array([spearman(a[i], b[i]) for i in range(n)], dtype=np.float64)
    s = np.array([ssim(normalize_abs(a[i]), normalize_abs(b[i])) if min(a.shape[1:]) >= 3
                  else np.nan for i in range(n)], dtype=np.float64)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(n, -1).max(axis=1)
    scale = np.abs(a.astype(np.float64)).reshape(n, -1).max(axis=1)
    rel = diff / np.where(scale > 0, scale, 1.0)
    worst = int(np.nanargmin(rho)) if np.isfinite(rho).any() else 0

    def stat(v, f):
        v = v[np.isfinite(v)]
        return float(f(v)) if v.size else float("nan")

    return {
        "spearman_mean": stat(rho, np.mean), "spearman_min": stat(rho, np.min),
        "ssim_mean": stat(s, np.mean), "ssim_min": stat(s, np.min),
        "max_abs_diff": float(diff.max()) if n else 0.0,
        "max_rel_diff": float(rel.max()) if n else 0.0,
        "worst_image": worst,
        "per_image": {"spearman": rho.tolist(), "ssim": s.tolist(), "max_abs_diff": diff.tolist()},
    }


def compare_models(model_a, model_b, data, methods: Sequence[str] | str = DEFAULT_METHODS,
                   limit: int | None = None, out: str | os.PathLike | None = None, *,
                   preprocess_a=None, preprocess_b=None, device: str = "auto",
                   threads: int | None = None, seed: int = 0, atol: float = 1e-4,
                   rtol: float = 1e-4, min_spearman: float = 0.99,
                   options: dict | None = None) -> dict[str, Any]:
    """Compare two models (paths, ModelProtos or Engines) on ``data`` (anything
    :func:`onnxsal.data.load_dataset` reads, or an array [N, C, H, W] in [0, 1]).
    Writes ``compare.json`` and ``compare.md`` to ``out`` when given; returns the report."""
    from . import methods as M

    t0 = time.perf_counter()
    if out is not None:
        check_output_dir(out)  # before any work
    ea = _engine(model_a, preprocess_a, device, threads)
    eb = _engine(model_b, preprocess_b, device, threads)
    if tuple(ea.input_shape) != tuple(eb.input_shape):
        raise OptionError(f"the models take different inputs: A {list(ea.input_shape)} and B "
                          f"{list(eb.input_shape)} (C, H, W of [0, 1] pixels after each model's "
                          "preprocessing); compare models of the same input space")
    if ea.num_classes != eb.num_classes:
        raise OptionError(f"the models have different class counts: A {ea.num_classes}, "
                          f"B {eb.num_classes}")
    names = M.resolve(methods) if methods else []
    x, labels, source, notes = _images(data, ea.input_shape, limit)
    la, lb = ea.logits(x), eb.logits(x)
    ya, yb = la.argmax(1), lb.argmax(1)
    pred, span = _prediction_agreement(la, lb, labels)
    per_method, errors = _map_agreements(ea, eb, x, ya, names, dict(options or {}), seed)
    tol = atol + rtol * span
    same_pred = pred["top1_agreement"] == 1.0 and pred["max_abs_logit_diff"] <= tol
    same_maps = all(np.isfinite(v["spearman_min"]) and v["spearman_min"] >= min_spearman
                    for v in per_method.values())
    if pred["nonfinite_a"] or pred["nonfinite_b"]:
        verdict = "not comparable: " + "; ".join(
            f"model {k.upper()}'s logits are NaN or Inf on {pred['nonfinite_' + k]} of {len(x)} images"
            for k in "ab" if pred["nonfinite_" + k])
    elif same_pred and same_maps and not errors:
        verdict = "same model: predictions and maps agree within tolerance"
    elif not same_pred:
        k = int((ya != yb).sum())
        verdict = (f"different predictions: top-1 differs on {k} of {len(x)} images, max logit "
                   f"difference {pred['max_abs_logit_diff']:.3g}" if k else
                   f"same top-1 everywhere, but logits differ by up to "
                   f"{pred['max_abs_logit_diff']:.3g} (tolerance {tol:.3g})")
    else:
        low = [n for n, v in per_method.items() if not (v["spearman_min"] >= min_spearman)]
        verdict = ("same predictions, different maps: " + ", ".join(low)) if low else \
            "same predictions; some methods failed: " + ", ".join(errors)
    report = {
        "models": {"a": _describe(model_a, ea), "b": _describe(model_b, eb)},
        "data": {"source": source, "count": int(len(x)), "shape": list(ea.input_shape), "notes": notes},
        "targets": "model A's predicted class",
        "tolerance": {"atol": atol, "rtol": rtol, "logit_tolerance": tol, "min_spearman": min_spearman},
        "predictions": pred,
        "methods": per_method,
        "errors": errors,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        atomic_write_json(Path(out) / "compare.json", report)
        atomic_write_text(Path(out) / "compare.md", markdown(report))
    return report


def _images(data, shape, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, str, list]:
    """(images, labels, source, notes) of ``data`` for models taking ``shape`` [C, H, W]."""
    from .data import load_dataset

    if isinstance(data, np.ndarray):
        x = np.asarray(data, np.float32)
        if limit is not None:
            x = x[:limit]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise OptionError(f"images of shape {list(x.shape)}; the models take "
                              f"[N, {', '.join(map(str, shape))}]")
        labels, source, notes = None, "array", []
    else:
        ds = load_dataset(data, shape=shape, limit=limit)
        x, labels, source, notes = ds.images, ds.labels, ds.source, list(ds.notes)
    if len(x) == 0:
        raise OptionError("no images to compare on")
    return x, labels, source, notes


def _prediction_agreement(la: np.ndarray, lb: np.ndarray, labels: np.ndarray | None) -> tuple[dict, float]:
    """How the two models' logits agree, and the span of model A's logits."""
    pa, pb = softmax(la, np.float64), softmax(lb, np.float64)
    ya, yb = la.argmax(1), lb.argmax(1)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf logits get their own verdict
        dl = np.abs(la.astype(np.float64) - lb.astype(np.float64))
        span = float(la.max() - la.min()) if la.size else 0.0
        pred = {
            "images": int(len(la)),
            "top1_agreement": float((ya == yb).mean()),
            "disagreements": [int(i) for i in np.flatnonzero(ya != yb)[:50]],
            "max_abs_logit_diff": float(dl.max()),
            "mean_abs_logit_diff": float(dl.mean()),
            "max_rel_logit_diff": float(dl.max() / span) if span > 0 else float(dl.max()),
            "max_abs_prob_diff": float(np.abs(pa - pb).max()),
            "nonfinite_a": int((~np.isfinite(la).all(axis=1)).sum()),
            "nonfinite_b": int((~np.isfinite(lb).all(axis=1)).sum()),
        }
    if labels is not None:
        pred["accuracy_a"] = float((ya == labels).mean())
        pred["accuracy_b"] = float((yb == labels).mean())
    return pred, span


def _map_agreements(ea, eb, x: np.ndarray, ya: np.ndarray, names: Sequence[str], opts: dict,
                    seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Per method: how the two models' maps of model A's predicted classes agree; methods
    that fail are reported in the second dict."""
    from . import methods as M

    per_method: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        m = M.get(name)
        o = dict(opts.get(name, {}))
        if "seed" in m.defaults:
            o.setdefault("seed", seed)
        try:
            ma = M.compute(ea, x, [name], targets=ya, **({name: o} if o else {}))[name]
            mb = M.compute(eb, x, [name], targets=ya, **({name: o} if o else {}))[name]
        except OptionError:
            raise
        except OnnxsalError as exc:  # e.g. an operator without a rule: report, keep the rest
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        per_method[name] = map_agreement(np.asarray(ma.maps), np.asarray(mb.maps))
        per_method[name]["signed"] = bool(ma.signed)
    return per_method, errors


def _describe(model, eng) -> dict:
    return {"path": getattr(eng, "path", None) or (str(model) if isinstance(model, (str, os.PathLike)) else None),
            "hash": getattr(eng, "model_hash", None), "provider": getattr(eng, "provider", None),
            "preprocess": eng.preprocess.describe() if hasattr(eng, "preprocess") else None,
            "classes": int(eng.num_classes)}


def markdown(report: dict) -> str:
    """The report as Markdown: predictions, then one row per method."""
    a, b = report["models"]["a"], report["models"]["b"]
    p = report["predictions"]
    lines = ["# Model comparison", "",
             f"A: `{printable(a['path'] or a['hash'][:12])}` ({a['preprocess']})  ",
             f"B: `{printable(b['path'] or b['hash'][:12])}` ({b['preprocess']})  ",
             f"Data: {report['data']['source']}, {report['data']['count']} images "
             f"{report['data']['shape']}; maps explain {report['targets']}.", "",
             f"**Verdict: {report['verdict']}**", "",
             "## Predictions", "",
             "| top-1 agreement | max abs logit diff | mean abs logit diff | max abs prob diff |"
             + (" accuracy A | accuracy B |" if "accuracy_a" in p else ""),
             "|---:|---:|---:|---:|" + ("---:|---:|" if "accuracy_a" in p else ""),
             f"| {p['top1_agreement']:.4f} | {p['max_abs_logit_diff']:.3g} | "
             f"{p['mean_abs_logit_diff']:.3g} | {p['max_abs_prob_diff']:.3g} |"
             + (f" {p['accuracy_a']:.4f} | {p['accuracy_b']:.4f} |" if "accuracy_a" in p else "")]
    if p["disagreements"]:
        lines += ["", "Images whose top-1 differs: " + ", ".join(map(str, p["disagreements"]))]
    if report["methods"]:
        lines += ["", "## Maps (same images, same targets)", "",
                  "| method | Spearman mean | Spearman min | SSIM mean | SSIM min | max abs diff "
                  "| max rel diff | worst image |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in report["methods"].items():
            lines.append(f"| {name} | {v['spearman_mean']:.4f} | {v['spearman_min']:.4f} | "
                         f"{v['ssim_mean']:.4f} | {v['ssim_min']:.4f} | {v['max_abs_diff']:.3g} | "
                         f"{v['max_rel_diff']:.3g} | {v['worst_image']} |")
    for name, err in report["errors"].items():
        lines.append(f"\n{name}: failed ({err})")
    return "\n".join(lines) + "\n"


__all__ = ["compare_models", "map_agreement", "markdown", "DEFAULT_METHODS"]
