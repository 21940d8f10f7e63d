"""``onnxsal explain``: maps of several methods for a few images, with figures.

Writes into the output folder, per image, ``<name>.png`` (the image, then one overlay per
method titled with the method, the class and its probability), plus ``maps.npz`` (raw maps
keyed ``<image>/<method>``) and ``predictions.json``. Files are written atomically; an image
whose maps fail (NaN, say) is listed in ``predictions.json`` and the others go on.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import methods as methods_pkg
from .data import Dataset, load_dataset
from .engine import Engine, softmax
from .errors import InputError, OnnxsalError
from .overlays import Panel, render
from .preprocess import PreprocessSpec


@dataclass
class ExplainResult:
    out_dir: Path
    images: int
    methods: list[str]
    seconds: float
    per_image_seconds: float
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_inputs(inputs: Sequence[str], shape, limit: int | None = None) -> Dataset:
    """Images from several files/folders/data-set names, concatenated."""
    parts = [load_dataset(src, shape=shape, limit=limit) for src in inputs]
    if not parts:
        raise InputError("no images given")
    if len(parts) == 1:
        return parts[0]
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels for p in parts])
    return Dataset(np.concatenate([p.images for p in parts]), labels,
                   [n for p in parts for n in p.names], "; ".join(p.source for p in parts),
                   parts[0].class_names, [n for p in parts for n in p.notes],
                   [f for p in parts for f in p.failures])


def engine_for_images(model: str, inputs: Sequence[str], limit: int | None = None,
                      preprocess: str | None = None, **options) -> tuple[Engine, list]:
    """(engine, inputs) for explaining ``inputs`` with ``model``. A model with dynamic H and
    W and no size given takes the images' own size when they all share one (a note in the
    data says so); the images are then read once and returned as the inputs to use."""
    from .data import load_raw
    from .model import load_model
    from .preprocess import DynamicSizeError, from_model, parse

    try:
        return Engine(model, preprocess=preprocess, **options), list(inputs)
    except DynamicSizeError:
        pass
    raws = [load_raw(src, limit=limit) for src in inputs]
    sizes = sorted({im.shape[:2] for r in raws for im in r.images})
    if len(sizes) != 1:
        raise InputError(f"the model's input size is dynamic and the images have "
                         f"{len(sizes)} sizes ({', '.join(f'{h}x{w}' for h, w in sizes[:4])}): "
                         "give one with --preprocess 'size=HxW'")
    (h, w), = sizes
    spec = parse(preprocess) if preprocess else from_model(load_model(model))
    spec = replace(spec or PreprocessSpec(), size=(int(h), int(w)))
    raws[0].notes.append(f"the model's input size is dynamic: the images' own size {h}x{w} is used")
    return Engine(model, preprocess=spec, **options), raws


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safe_name(name: str, used: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).stem) or "image"
    out, i = base, 1
    while out in used:
        i += 1
        out = f"{base}_{i}"
    used.add(out)
    return out


def run_explain(engine: Engine, inputs: Sequence[str], methods: Sequence[str], out_dir: str | os.PathLike,
                targets: int | None = None, labels: list[str] | None = None, limit: int | None = None,
                batch: int = 8, options: dict | None = None, progress: bool = True) -> ExplainResult:
    out_dir = Path(out_dir)
    names = methods_pkg.resolve(methods)
    data = load_inputs(inputs, engine.input_shape, limit)
    labels = labels or engine.labels or data.class_names
    if labels is not None and len(labels) != engine.num_classes:
        labels = None
    used: set[str] = set()
    stems = [_safe_name(n, used) for n in data.names]
    t0 = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    predictions, failures = [], [{"image": n, "error": e} for n, e in data.failures]
    bar = None
    if progress and len(data) > 4:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc="explain", unit="image")
    for start in range(0, len(data), batch):
        x = data.images[start:start + batch]
        try:
            maps = methods_pkg.compute(engine, x, names, targets=targets, **(options or {}))
        except OnnxsalError:
            raise
        logits = engine.logits(x)
        probs = softmax(logits)
        for i in range(len(x)):
            n = start + i
            stem = stems[n]
            pred = int(np.argmax(logits[i]))
            target = int(next(iter(maps.values())).targets[i])
            panels, bad = [], []
            for m, res in maps.items():
                mp = np.asarray(res.maps[i], np.float32)
                if not np.isfinite(mp).all():
                    bad.append(m)
                    continue
                arrays[f"{stem}/{m}"] = mp
                cls = labels[target] if labels else str(target)
                panels.append(Panel(f"{m}\n{cls} p={probs[i, target]:.2f}", mp, res.signed))
            if not np.isfinite(logits[i]).all():
                failures.append({"image": data.names[n], "error": "the model's logits are NaN or "
                                 "Inf for this image: its maps explain no real score"})
            if bad:
                failures.append({"image": data.names[n], "error": f"non-finite map from {', '.join(bad)}"})
            top = np.argsort(-probs[i])[:5]
            predictions.append({
                "image": data.names[n], "figure": f"{stem}.png", "predicted": pred,
                "predicted_name": labels[pred] if labels else None,
                "probability": float(probs[i, pred]), "target": target,
                "label": int(data.labels[n]) if data.labels is not None else None,
                "top5": [{"class": int(c), "name": labels[c] if labels else None,
                          "probability": float(probs[i, c])} for c in top],
                "finite_logits": bool(np.isfinite(logits[i]).all()),
            })
            title = f"{data.names[n]}: predicted {labels[pred] if labels else pred} ({probs[i, pred]:.2f})"
            render(x[i], panels, out_dir / f"{stem}.png", title=title)
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    def save_maps(p):
        with open(p, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic_write(out_dir / "maps.npz", save_maps)
    summary = {"model": engine.path, "model_hash": engine.model_hash, "provider": engine.provider,
               "gradients": getattr(engine, "gradient_source", None),
               "preprocess": engine.preprocess.describe(), "methods": names,
               "images": predictions, "failures": failures, "notes": data.notes,
               "seconds": seconds}
    _atomic_write(out_dir / "predictions.json",
                  lambda p: Path(p).write_text(json.dumps(summary, indent=2), encoding="utf-8"))
    return ExplainResult(out_dir, len(data), names, seconds, seconds / max(len(data), 1),
                         failures, list(data.notes))
