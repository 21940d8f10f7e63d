"""``onnxsal explain``: maps of several methods for a few images, with figures.

Writes into the output folder, per image, ``<name>.png`` (the image, then one overlay per
method titled with the method, the class and its probability), plus ``maps.npz`` (raw maps
keyed ``<image>/<method>``) and ``predictions.json``. Methods that give structured explanations
(rules, counterfactuals, exemplars: ``Method.explains()``) add ``explanations.json``, their
arrays in ``maps.npz`` as ``<image>/<method>:<name>`` and one figure per image in
``explanations/<image>.png`` (docs/extending.md#structured-explanations). Data come first: each batch's maps are
written to a part file as soon as they are computed and merged into ``maps.npz`` at the end,
also when the run stops with an error; figures are drawn after their batch's data. An input
that cannot be read, an image whose maps fail (NaN, say) or whose figure fails is listed in
``predictions.json`` and the others go on. The output folder is checked before any work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import methods as methods_pkg
from .data import Dataset, load_dataset
from .display import file_stem, printable
from .engine import Engine
from .errors import InputError, OnnxsalError, OutputError
from .files import atomic_write, atomic_write_json
from .numeric import softmax
from .overlays import Panel, draw_figures, render, render_pictures
from .preprocess import PreprocessSpec
from .report import check_output_dir


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
    """Images from several files/folders/data-set names, concatenated. An input that cannot be
    used at all (a corrupt file, a folder of no images) is a failure of its own and the others
    go on; when none is usable, the error of the only (or first) one is raised."""
    if not inputs:
        raise InputError("no images given")
    parts, bad = [], []
    for src in inputs:
        try:
            parts.append(load_dataset(src, shape=shape, limit=limit))
        except InputError as exc:
            bad.append((str(src), exc))
    if not parts:
        if len(bad) == 1:
            raise bad[0][1]
        raise InputError(f"none of the {len(bad)} inputs is usable ({bad[0][0]}: {bad[0][1]}; ...)")
    failures = [(src, str(exc)) for src, exc in bad]
    if len(parts) == 1:
        parts[0].failures[:0] = failures
        return parts[0]
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels for p in parts])
    return Dataset(np.concatenate([p.images for p in parts]), labels,
                   [n for p in parts for n in p.names], "; ".join(p.source for p in parts),
                   parts[0].class_names, [n for p in parts for n in p.notes],
                   failures + [f for p in parts for f in p.failures])


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
    raws: list = []
    for src in inputs:
        try:
            raws.append(load_raw(src, limit=limit))
        except InputError:
            raws.append(src)  # load_inputs lists it as a failure and the others go on
    sizes = sorted({im.shape[:2] for r in raws if not isinstance(r, str) for im in r.images})
    if not sizes:
        return Engine(model, preprocess=preprocess, **options), list(inputs)
    if len(sizes) != 1:
        raise InputError(f"the model's input size is dynamic and the images have "
                         f"{len(sizes)} sizes ({', '.join(f'{h}x{w}' for h, w in sizes[:4])}): "
                         "give one with --preprocess 'size=HxW'")
    (h, w), = sizes
    spec = parse(preprocess) if preprocess else from_model(load_model(model))
    spec = replace(spec or PreprocessSpec(), size=(int(h), int(w)))
    first = next(r for r in raws if not isinstance(r, str))
    first.notes.append(f"the model's input size is dynamic: the images' own size {h}x{w} is used")
    return Engine(model, preprocess=spec, **options), raws


def _stems(names: Sequence[str]) -> list[str]:
    """A distinct, safe file-name stem per image name."""
    used: set[str] = set()
    out = []
    for name in names:
        base = file_stem(Path(name).stem)
        stem, i = base, 1
        while stem in used:
            i += 1
            stem = f"{base}_{i}"
        used.add(stem)
        out.append(stem)
    return out


class _MapStore:
    """Maps saved as they are computed: one part file per batch in a hidden folder of the
    output, merged into one ``.npz`` at the end by streaming (linear in the maps, one map in
    memory at a time); the parts stay when the merge cannot be written."""

    def __init__(self, out_dir: Path):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=".maps-parts-"))
        except OSError as exc:
            raise OutputError(f"cannot write in {printable(out_dir)}: {exc.strerror}") from None
        self.parts: list[Path] = []
        self.images = 0
        self.merged = False

    def add(self, arrays: dict[str, np.ndarray], images: int) -> None:
        if arrays:
            part = self.dir / f"{len(self.parts):06d}.npz"
            atomic_write(part, lambda f: np.savez(f, **arrays))
            self.parts.append(part)
        self.images += images

    def merge(self, path: Path) -> None:
        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                for part in self.parts:
                    with np.load(part, allow_pickle=False) as z:
                        for key in z.files:
                            with zf.open(key + ".npy", "w", force_zip64=True) as entry:
                                np.lib.format.write_array(entry, z[key], allow_pickle=False)

        atomic_write(path, write)
        self.merged = True
        shutil.rmtree(self.dir, ignore_errors=True)


def run_explain(engine: Engine, inputs: Sequence[str], methods: Sequence[str], out_dir: str | os.PathLike,
                targets: int | None = None, labels: list[str] | None = None, limit: int | None = None,
                batch: int = 8, options: dict | None = None, progress: bool = True) -> ExplainResult:
    out_dir = check_output_dir(out_dir)
    names = methods_pkg.resolve(methods)
    data = load_inputs(inputs, engine.input_shape, limit)
    labels = labels or engine.labels or data.class_names
    if labels is not None and len(labels) != engine.num_classes:
        labels = None
    run = _Run(engine, data, names, labels, targets, options or {}, _stems(data.names))
    t0 = time.perf_counter()
    store = _MapStore(out_dir)
    bar = None
    if progress and len(data) > 4:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc="explain", unit="image")
    try:
        for start in range(0, len(data), batch):
            run.batch(start, data.images[start:start + batch], store, out_dir)
            if bar is not None:
                bar.update(min(batch, len(data) - start))
    except BaseException as exc:
        kept = run.save(store, out_dir, time.perf_counter() - t0, complete=False)
        if isinstance(exc, OnnxsalError) and store.images:
            exc.args = (f"{exc}; {kept}",)  # the one line says what is kept
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    run.save(store, out_dir, seconds, complete=True)
    return ExplainResult(out_dir, len(data), names, seconds, seconds / max(len(data), 1),
                         run.failures, [printable(n) for n in data.notes])


class _Run:
    """The state of one explain run: what is computed, per batch, and how it is saved."""

    def __init__(self, engine, data, names, labels, targets, options, stems):
        self.engine, self.data, self.names, self.labels = engine, data, names, labels
        self.targets, self.options, self.stems = targets, options, stems
        self.predictions: list[dict] = []
        self.explanations: list[dict] = []
        self.explaining = [n for n in names if methods_pkg.get(n).explains()]
        self.failures = [{"image": printable(n), "error": printable(e)} for n, e in data.failures]

    def _label(self, k: int):
        return self.labels[k] if self.labels else None

    def batch(self, start: int, x: np.ndarray, store: _MapStore, out_dir: Path) -> None:
        """Maps and predictions of one batch, saved; then its figures."""
        maps = methods_pkg.compute(self.engine, x, self.names, targets=self.targets, **self.options)
        logits = self.engine.logits(x)
        probs = softmax(logits)
        arrays, figures, preds, fails = {}, [], [], []
        for i in range(len(x)):
            n = start + i
            name, stem = printable(self.data.names[n]), self.stems[n]
            pred = int(np.argmax(logits[i]))
            target = int(next(iter(maps.values())).targets[i])
            panels, bad = [], []
            for m, res in maps.items():
                mp = np.asarray(res.maps[i], np.float32)
                if not np.isfinite(mp).all():
                    bad.append(m)
                    continue
                arrays[f"{stem}/{m}"] = mp
                cls = self._label(target) or str(target)
                panels.append(Panel(f"{m}\n{cls} p={probs[i, target]:.2f}", mp, res.signed))
            finite = bool(np.isfinite(logits[i]).all())
            if not finite:
                fails.append({"image": name, "error": "the model's logits are NaN or Inf "
                                      "for this image: its maps explain no real score"})
            if bad:
                fails.append({"image": name, "error": f"non-finite map from {', '.join(bad)}"})
            top = np.argsort(-probs[i])[:5]
            preds.append({
                "image": name, "figure": f"{stem}.png", "predicted": pred,
                "predicted_name": self._label(pred), "probability": float(probs[i, pred]),
                "target": target,
                "label": int(self.data.labels[n]) if self.data.labels is not None else None,
                "top5": [{"class": int(c), "name": self._label(c),
                          "probability": float(probs[i, c])} for c in top],
                "finite_logits": finite,
            })
            title = f"{name}: predicted {self._label(pred) or pred} ({probs[i, pred]:.2f})"
            figures.append((name, lambda i=i, p=panels, s=stem, t=title:
                            render(x[i], p, out_dir / f"{s}.png", title=t)))
            if self.explaining:
                pics = self._explain(maps, i, x[i], name, stem, arrays, fails)
                if pics:
                    figures.append((name, lambda p=pics, s=stem, t=title:
                                    render_pictures(p, out_dir / "explanations" / f"{s}.png", title=t)))
        store.add(arrays, len(x))  # the data first: a figure never costs a map
        self.predictions += preds  # what predictions.json lists is what maps.npz holds
        self.failures += fails
        for name, err in draw_figures(figures):
            self.failures.append({"image": name, "error": f"{err}; its maps are in maps.npz"})

    def _explain(self, maps, i: int, image: np.ndarray, name: str, stem: str, arrays: dict,
                 fails: list) -> list:
        """Image i's structured explanations (collected for explanations.json), their arrays
        (added to ``arrays``) and the pictures of its explanations figure."""
        entry: dict = {"image": name, "figure": f"explanations/{stem}.png", "methods": {}}
        pics: list = []
        for m in self.explaining:
            method, res = methods_pkg.get(m), maps[m]
            try:
                entry["methods"][m] = method.explanation(res, i, self.labels)
                for k, v in method.explanation_arrays(res, i).items():
                    arrays[f"{stem}/{m}:{k}"] = np.asarray(v)
                pics += method.explanation_pictures(res, i, image, self.labels)
            except Exception as exc:  # a method's hook must not cost the other images
                fails.append({"image": name, "error": f"explanation of {m} not written "
                                      f"({type(exc).__name__}: {printable(str(exc))})"})
        if not pics:
            entry["figure"] = None
        self.explanations.append(entry)
        return pics

    def save(self, store: _MapStore, out_dir: Path, seconds: float, complete: bool) -> str:
        """Write maps.npz and predictions.json; returns where the maps are. A run that stopped
        (``complete`` false) saves what it has, and a failure to write it is not raised (the
        error that stopped the run is the one to report, with where the maps are)."""
        e = self.engine
        summary = {"model": e.path, "model_hash": e.model_hash, "provider": e.provider,
                   "gradients": e.gradient_source,
                   "preprocess": e.preprocess.describe(), "methods": self.names,
                   "images": self.predictions, "failures": self.failures,
                   "notes": [printable(n) for n in self.data.notes], "seconds": seconds,
                   "complete": complete}
        writes = [lambda: store.merge(out_dir / "maps.npz"),
                  lambda: atomic_write_json(out_dir / "predictions.json", summary)]
        if self.explaining:
            explained = {"model": e.path, "model_hash": e.model_hash, "methods": self.explaining,
                         "labels": self.labels, "images": self.explanations, "complete": complete}
            writes.append(lambda: atomic_write_json(out_dir / "explanations.json", explained))
        errors = []
        for write in writes:
            try:
                write()
            except OutputError as exc:
                errors.append(exc)
        where = (f"the maps of the {store.images} images explained are in "
                 + (f"{printable(out_dir)}/maps.npz" if store.merged else
                    f"{printable(store.dir)} (one .npz per batch)"))
        if errors and complete:
            raise OutputError(f"{errors[0]}; {where}")
        return where
