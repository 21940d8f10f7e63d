"""The standardized benchmark across architectures and frameworks (issue 16, item 5): every model x
every saliency method x every registered metric that applies, on a fixed sample of the
Fashion-MNIST test set. Results: benchmarks/results/cross_architecture/.

Models: the paper's CNN and ResNet-18 (benchmarks/paper/models/, trained by
benchmarks/paper/train_fashion.py on all 60k images), and, trained here by the ``train`` step on a
subset of the training set, a MobileNetV2-style net, a small ConvNeXt, a small ViT and an MLP in
PyTorch, and the paper's CNN and the MLP in Keras and in JAX/flax (benchmarks/models/cross_architecture.py),
each exported by the project's converter (converters/torch_export.py, keras_export.py, jax_export.py).

    python benchmarks/cross_architecture.py train [--models mobilenet,vit] [--train 20000]
    python benchmarks/cross_architecture.py evaluate [--images 100] [--models ...] [--methods ...] [--metrics ...]
    python benchmarks/cross_architecture.py report           # tables, plot and README from results.json

``evaluate`` iterates over the registries (``onnxsal.methods.names()``, ``onnxsal.metrics.base.names()``),
so metrics and methods added later are included when it is re-run; a metric that cannot be built
or run here (ground-truth masks, an option the benchmark cannot give) is recorded with its reason.
One JSON part per model under ``<out>/parts/`` makes it resumable (a part whose settings match
is reused). Run with OMP_NUM_THREADS=1; every session uses 1 thread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "cross_architecture"
PAPER = ROOT / "benchmarks" / "paper" / "models"
PREPROCESS = {"scale": 1.0, "mean": [0.0], "std": [1.0], "bgr": False}
SHIFT = 1.0  # the constant input shift of the input-invariance test
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/cross_architecture.py"

#: name -> (framework, builder in benchmarks.models.cross_architecture, epochs); "paper" models
#: are the files trained by benchmarks/paper/train_fashion.py.
MODELS: dict[str, dict] = {
    "paper_cnn": {"framework": "torch", "paper": "cnn"},
    "resnet18": {"framework": "torch", "paper": "resnet18"},
    "convnext": {"framework": "torch", "build": "torch_convnext", "epochs": 3},
    "vit": {"framework": "torch", "build": "torch_vit", "epochs": 5},
    "mlp": {"framework": "torch", "build": "torch_mlp", "epochs": 5},
    # depthwise convolutions train slowly on this CPU (15 min per 20000 images with 1 thread)
    "mobilenet": {"framework": "torch", "build": "torch_mobilenet", "epochs": 1, "train_images": 12000},
    "paper_cnn_keras": {"framework": "keras", "build": "keras_paper_cnn", "epochs": 3},
    "mlp_keras": {"framework": "keras", "build": "keras_mlp", "epochs": 5},
    "paper_cnn_jax": {"framework": "jax", "build": "paper_cnn", "epochs": 3},
    "mlp_jax": {"framework": "jax", "build": "mlp", "epochs": 5},
}


# ----------------------------------------------------------------------------- train step

def model_path(name: str, out: Path = OUT) -> Path:
    spec = MODELS[name]
    if "paper" in spec:
        return PAPER / f"fashion_{spec['paper']}.onnx"
    return out / "models" / f"{name}.onnx"


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from onnxsal.engine import Engine

    eng = Engine(str(path), device="cpu", threads=1, use_disk_cache=False)
    return float((eng.logits(x).argmax(1) == y).mean())


def train_one(name: str, data, n_train: int, out: Path, log=print) -> dict:
    """Train model ``name`` on the first ``n_train`` images of a seeded permutation of the
    training set, export it to ONNX and return its log (test accuracy on all 10000 images)."""
    from benchmarks.models import cross_architecture as ca
    from onnxsal.data import FASHION_MNIST_CLASSES

    xtr, ytr, xte, yte = data
    spec = MODELS[name]
    n_train = min(n_train, spec.get("train_images", n_train))
    idx = np.random.default_rng(0).permutation(len(xtr))[:n_train]
    xs, ys = xtr[idx], ytr[idx]
    path = model_path(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fw, epochs = spec["framework"], spec["epochs"]
    rec: dict = {"framework": fw, "epochs": epochs, "train_images": int(n_train)}
    if fw == "torch":
        import torch

        from benchmarks.models.training import train
        from converters.torch_export import export

        torch.manual_seed(42)
        model = getattr(ca, spec["build"])()
        res = train(model, xs, ys, xte, yte, epochs=epochs, threads=1, log=log)
        rec.update(test_accuracy=res.test_accuracy, train_seconds=round(res.seconds, 1),
                   train_loss=[h["train_loss"] for h in res.history],
                   parameters=int(sum(p.numel() for p in model.parameters())))
        export(model.eval(), (1, 28, 28), path, opset=17, dynamo=False, preprocess=PREPROCESS,
               labels=FASHION_MNIST_CLASSES)
    elif fw == "keras":
        from converters import keras_export

        keras_export._quiet_tf()  # before tensorflow: torch._dynamo imported after it segfaults
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)

        model = getattr(ca, spec["build"])()
        rec.update(ca.train_keras(model, xs, ys, xte, yte, epochs, log=log), parameters=int(model.count_params()))
        rec["test_accuracy"] = rec.pop("test_accuracy")
        keras_export.export(model, path, opset=17, preprocess=PREPROCESS, labels=FASHION_MNIST_CLASSES)
    else:
        import jax

        from converters import jax_export

        apply, variables, r = ca.train_flax(ca.flax_module(spec["build"]), xs, ys, xte, yte, epochs, log=log)
        rec.update(r, parameters=int(sum(np.size(v) for v in jax.tree_util.tree_leaves(variables))))
        jax_export.export(apply, (1, 28, 28), path, params=variables, opset=23, preprocess=PREPROCESS,
                          labels=FASHION_MNIST_CLASSES)
    rec["onnx_test_accuracy"] = onnx_accuracy(path, xte, yte)
    if abs(rec["onnx_test_accuracy"] - rec["test_accuracy"]) > 0.002:  # the exported file is another model
        raise RuntimeError(f"{name}: the ONNX file's test accuracy {rec['onnx_test_accuracy']:.4f} differs from "
                           f"the framework's {rec['test_accuracy']:.4f}")
    rec["onnx_bytes"] = int(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")))
    return rec


def cmd_train(args) -> None:
    from benchmarks.models.training import load_fashion_mnist_nchw

    out = Path(args.out)
    names = _names(args.models) or [n for n in MODELS if "paper" not in MODELS[n]]
    data = load_fashion_mnist_nchw()
    for name in names:
        if "paper" in MODELS[name]:
            print(f"{name}: trained by benchmarks/paper/train_fashion.py, not here", flush=True)
            continue
        logf = out / "models" / f"train_log_{name}.json"
        if logf.is_file() and model_path(name, out).is_file() and not args.force:
            print(f"{name}: already trained ({logf})", flush=True)
            continue
        rec = train_one(name, data, args.train, out, log=lambda s, n=name: print(n, s, flush=True))
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        logf.write_text(json.dumps(rec, indent=2))
        print(name, {k: v for k, v in rec.items() if k != "train_loss"}, flush=True)


def model_info(name: str, out: Path) -> dict:
    """Training facts of a model (its train log)."""
    spec = MODELS.get(name)
    if spec is None:
        return {}
    if "paper" in spec:
        f = PAPER / f"train_log_{spec['paper']}.json"
        d = json.loads(f.read_text())[spec["paper"]] if f.is_file() else {}
        return {"framework": "torch", "epochs": d.get("epochs"), "train_images": 60000,
                "test_accuracy": d.get("onnx_test_accuracy"), "train_seconds": d.get("train_seconds"),
                "trained_by": "benchmarks/paper/train_fashion.py", "onnx_bytes": d.get("onnx_bytes")}
    f = out / "models" / f"train_log_{name}.json"
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    return {k: d.get(k) for k in ("framework", "epochs", "train_images", "onnx_test_accuracy", "train_seconds",
                                  "parameters", "onnx_bytes")} | {"test_accuracy": d.get("onnx_test_accuracy")}


# ----------------------------------------------------------------------------- evaluate step

def sample(n: int, seed: int = 0):
    """The fixed sample: ``n`` test images drawn without replacement by a seeded generator, in
    index order: (images [n, 1, 28, 28] in [0, 1], labels, indices)."""
    from onnxsal.data import fashion_mnist_arrays

    x, y, _ = fashion_mnist_arrays("test")
    idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[idx, None].astype(np.float32) / 255.0, y[idx].astype(np.int64), idx


def shifted_engine(engine, path: str, shift: float):
    """An engine for f2(x) = f(x - shift), so that f2(x + shift) = f(x) exactly: the shift is
    folded into the prepended preprocessing (``Engine(input_shift=)``), for any first layer (a
    bias absorbing it, as in Kindermans et al., is not exact at zero-padded borders)."""
    from onnxsal.engine import Engine

    return Engine(path, preprocess=engine.preprocess, input_shift=shift, device="cpu", threads=1,
                  use_disk_cache=False)


def method_options(name: str) -> dict:
    from onnxsal import methods as M

    return {"seed": 0} if "seed" in M.METHODS[name].defaults else {}


def scalars(metric, result, names: list[str]) -> dict[str, dict]:
    """{column: {"value", "direction", ...}} of one metric result: its ``value``, or its AUC (one
    column per deletion mode when it has several), with a 95% bootstrap interval of the mean when
    the result has per-image values."""
    s = metric.summarize(result, names)
    direction = s.get("direction", metric.direction)
    out: dict[str, dict] = {}
    if "value" in s:
        out[metric.name] = {"value": s["value"]}
        per = result.get("per_image") if isinstance(result, dict) else None
        if per is not None:
            out[metric.name].update(bootstrap(np.asarray(per, np.float64)))
    elif isinstance(s.get("auc"), dict):
        for k, v in s["auc"].items():
            out[f"{metric.name}:{k}"] = {"value": v}
    elif "auc" in s:
        out[metric.name] = {"value": s["auc"]}
    for d in out.values():
        d["direction"] = direction
        d["valid_images"] = s.get("valid_images")
        d["value"] = None if d["value"] is None or not np.isfinite(d["value"]) else float(d["value"])
    return out


def bootstrap(v: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return {}
    means = v[np.random.default_rng(seed).integers(0, len(v), (n, len(v)))].mean(axis=1)
    return {"ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def evaluate_model(path: str, x: np.ndarray, y: np.ndarray, methods: list[str], metrics: list[str],
                   log=print, done: dict | None = None, save=None) -> dict:
    """All methods x metrics on one model: {"accuracy", "methods": {m: {"seconds", "error"}},
    "metrics": {column: {method: {...}}}, "skipped": {metric: reason}, "errors": {...}}.
    ``done``: an earlier result on the same images and metrics whose methods are kept;
    ``save(result)`` is called after each method (a checkpoint)."""
    from onnxsal import methods as M
    from onnxsal.engine import Engine

    eng = Engine(path, device="cpu", threads=1, use_disk_cache=False)
    eng2 = shifted_engine(eng, path, SHIFT)
    res: dict = {"accuracy_on_sample": float((eng.logits(x).argmax(1) == y).mean()), "methods": {},
                 "metrics": {}, "skipped": {}, "errors": {}}
    if done:
        keep = [m for m in methods if m in done["methods"]]
        res["methods"] = {m: done["methods"][m] for m in keep}
        res["metrics"] = {c: {m: d for m, d in per.items() if m in keep} for c, per in done["metrics"].items()}
        res["skipped"] = dict(done["skipped"])
        res["errors"] = {k: {m: e for m, e in per.items() if m in keep} for k, per in done["errors"].items()}
    for m in methods:
        if m in res["methods"]:
            continue
        if save is not None:
            save(res)
        t0 = time.perf_counter()
        try:
            maps = np.asarray(M.compute(eng, x, [m], **method_options(m))[m].maps, np.float32)
        except Exception as exc:  # a method that cannot run on this model: recorded, not fatal
            res["methods"][m] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  method {m}: {res['methods'][m]['error']}")
            continue
        res["methods"][m] = {"seconds": round(time.perf_counter() - t0, 2)}
        score_method(eng, eng2, x, y, m, maps, metrics, res)
        log(f"  method {m}: {res['methods'][m]['seconds']} s, metrics done "
            f"({sum(1 for c in res['metrics'].values() if m in c)} columns)")
    return res


class Memo:
    """``explain(images, targets)`` remembered by the bytes of its arguments: max- and
    average-sensitivity draw the same noise (same seed), so the second re-uses the first's maps."""

    def __init__(self, explain):
        self.explain, self.seen = explain, {}

    def __call__(self, a, t):
        a, t = np.ascontiguousarray(a), np.ascontiguousarray(t)
        key = (a.shape, a.dtype.str, hashlib.sha256(a).hexdigest(), hashlib.sha256(t).hexdigest())
        if key not in self.seen:
            self.seen[key] = np.asarray(self.explain(a, t))
        return self.seen[key]


def score_method(eng, eng2, x: np.ndarray, y: np.ndarray, m: str, maps: np.ndarray, metrics: list[str],
                 res: dict, metric_options: dict | None = None) -> None:
    """Score method ``m``'s maps with each metric into ``res`` (its columns, skips and errors);
    ``metric_options`` (e.g. {"sensitivity_samples": 10}) override the metrics' defaults."""
    from onnxsal import methods as M
    from onnxsal.errors import OptionError
    from onnxsal.metrics import base
    from onnxsal.metrics.randomisation_mprt import model_explainer

    names = [str(i) for i in range(len(x))]
    opts = {"seed": 0,
            "explain_class": Memo(lambda a, t: M.compute(eng, a, [m], targets=t, **method_options(m))[m].maps),
            "explain": lambda a, t=None: M.compute(eng, a, [m], targets=t, **method_options(m))[m].maps,
            "explain_shifted": lambda a, t: M.compute(eng2, a, [m], targets=t, **method_options(m))[m].maps,
            # the MPRTs: the method on re-weighted copies of the model, on engines like this one
            "model": eng.source_model,
            "explain_model": model_explainer(m, method_options(m) or None, preprocess=eng.preprocess,
                                             device="cpu", threads=1, use_disk_cache=False),
            **(metric_options or {})}
    for k in metrics:
        cls = base.get(k)
        try:
            metric = cls.from_options(opts)
        except OptionError as exc:
            res["skipped"][k] = str(exc)
            continue
        res["skipped"].pop(k, None)
        t0 = time.perf_counter()
        try:
            out = metric(eng.logits, x, maps, y)
        except Exception as exc:
            res["errors"].setdefault(k, {})[m] = f"{type(exc).__name__}: {exc}"
            continue
        if m in res["errors"].get(k, {}):
            del res["errors"][k][m]
        for col, d in scalars(metric, out, names).items():
            d["seconds"] = round(time.perf_counter() - t0, 3)
            res["metrics"].setdefault(col, {})[m] = d


def add_metrics(path: str, x: np.ndarray, y: np.ndarray, metrics: list[str], res: dict, log=print,
                methods: list[str] | None = None, metric_options: dict | None = None) -> dict:
    """``res`` (a model's part, e.g. from the committed results.json) with the columns of
    ``metrics`` (re)computed for each of its methods (or those of ``methods``): the maps are
    recomputed (every method is deterministic at its seed), the other columns are kept. A method
    left out keeps its scores of these columns; one left out that has none is listed under
    ``res["unscored"][metric]``."""
    from onnxsal import methods as M
    from onnxsal.engine import Engine

    eng = Engine(path, device="cpu", threads=1, use_disk_cache=False)
    eng2 = shifted_engine(eng, path, SHIFT)
    for m, info in res["methods"].items():
        if "error" in info:
            continue
        unscored = res.setdefault("unscored", {})
        if methods is not None and m not in methods:
            for k in metrics:
                if not any(m in d for c, d in res["metrics"].items() if c == k or c.startswith(k + ":")):
                    unscored[k] = sorted(set(unscored.get(k, [])) | {m})
            continue
        for k in metrics:
            if m in unscored.get(k, []):
                unscored[k].remove(m)
        t0 = time.perf_counter()
        maps = np.asarray(M.compute(eng, x, [m], **method_options(m))[m].maps, np.float32)
        score_method(eng, eng2, x, y, m, maps, metrics, res, metric_options)
        log(f"  method {m}: {time.perf_counter() - t0:.1f} s for {', '.join(metrics)}")
    res["unscored"] = {k: v for k, v in res.get("unscored", {}).items() if v}
    if not res["unscored"]:
        del res["unscored"]
    return res


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).parent.glob(Path(path).name + "*")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cmd_evaluate(args) -> dict:
    from onnxsal import methods as M
    from onnxsal.metrics import base

    out = Path(args.out)
    models = {}
    for item in _names(args.models) or list(MODELS):
        name, _, p = item.partition("=")  # NAME or NAME=PATH (any ONNX file)
        models[name] = p or str(model_path(name, out))
    methods = M.resolve(_names(args.methods) or "all")
    metrics = _names(args.metrics) or base.names()
    for k in metrics:
        base.get(k)
    x, y, idx = sample(args.images, args.seed)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    parts = {}
    t_all = time.perf_counter()
    for name, path in models.items():
        if not Path(path).is_file():
            print(f"{name}: {path} missing (run the train step)", flush=True)
            continue
        skip = [k for item in _names(args.skip) for mod, _, k in [item.partition(":")] if mod == name]
        settings = {"model": name, "file_sha256_16": file_hash(path), "images": args.images, "seed": args.seed,
                    "metrics": metrics, "skipped_for_time": skip}
        pf = out / "parts" / f"{name}.json"
        old = json.loads(pf.read_text()) if pf.is_file() and not args.force else None
        if old is not None and old.get("settings") != settings:
            old = None
        if old is not None and all(m in old["methods"] for m in methods):
            print(f"{name}: reusing {pf}", flush=True)
            parts[name] = old
            continue
        print(f"{name}: evaluating {path}" + (f" (resuming: {len(old['methods'])} methods done)" if old else ""),
              flush=True)
        t0 = time.perf_counter()
        spent = old["seconds"] if old else 0.0
        rel = os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else str(path)

        def save(r, t0=t0, spent=spent, rel=rel, pf=pf, settings=settings):
            r.update(seconds=round(spent + time.perf_counter() - t0, 1), settings=settings, file=rel)
            pf.write_text(json.dumps(r, indent=1))

        r = evaluate_model(path, x, y, methods, [k for k in metrics if k not in skip],
                           log=lambda s: print(s, flush=True), done=old, save=save)
        r["skipped"].update({k: f"not run on {name} for time (--skip {name}:{k})" for k in skip})
        save(r)
        parts[name] = r
        print(f"{name}: {r['seconds']} s", flush=True)
    result = assemble(parts, out, args, methods, metrics, idx, time.perf_counter() - t_all)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(result, out)
    return result


def versions() -> dict:
    import importlib.metadata as md

    v = {}
    for p in ("onnxsal", "onnx", "onnxruntime", "numpy", "torch", "torchvision", "tensorflow", "keras", "tf2onnx",
              "jax", "flax", "optax", "jax2onnx"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return v


def assemble(parts: dict, out: Path, args, methods, metrics, idx, seconds: float) -> dict:
    models = {}
    for name, r in parts.items():
        models[name] = {"info": model_info(name, out), **{k: r[k] for k in ("file", "accuracy_on_sample", "seconds",
                                                                              "methods", "metrics", "skipped",
                                                                              "errors")},
                        **({"unscored": r["unscored"]} if r.get("unscored") else {})}
    res = {"setup": {"images": args.images, "seed": args.seed, "test_indices": [int(i) for i in idx],
                     "methods": methods, "metrics": metrics, "input_invariance_shift": SHIFT,
                     "evaluate_seconds_this_run": round(seconds, 1),
                     "evaluate_seconds_sum_of_parts": round(sum(p["seconds"] for p in parts.values()), 1),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                     "python": platform.python_version(), "versions": versions(),
                     "skip": args.skip or "",
                     "command": f"{COMMAND} train && {COMMAND} evaluate --images {args.images}"
                     + (f" --skip {args.skip}" if args.skip else "")},
           "models": models}
    res["analysis"] = analyse(res)
    return res


# ----------------------------------------------------------------------------- analysis and report

def columns(res: dict) -> list[str]:
    cols: set[str] = set()
    for m in res["models"].values():
        cols.update(m["metrics"])
    return sorted(cols)


def direction(res: dict, col: str) -> str:
    for m in res["models"].values():
        for d in m["metrics"].get(col, {}).values():
            return d["direction"]
    return "lower"


def ranks(res: dict, model: str, col: str, methods: list[str]) -> dict[str, float]:
    """Rank of each method with a finite value (1 = best, ties averaged)."""
    from scipy.stats import rankdata

    vals = {m: d["value"] for m, d in res["models"][model]["metrics"].get(col, {}).items()
            if m in methods and d["value"] is not None}
    if not vals:
        return {}
    keys = list(vals)
    v = np.array([vals[k] for k in keys])
    r = rankdata(-v if direction(res, col) == "higher" else v)
    return dict(zip(keys, r.tolist()))


def analyse(res: dict) -> dict:
    """Per metric column: the mean rank of each method over the models, the winner per model,
    the overall winner (lowest mean rank), and the mean and minimum Kendall tau between the
    models' method rankings (over the methods both models scored)."""
    from itertools import combinations

    from scipy.stats import kendalltau

    methods = res["setup"]["methods"]
    out = {}
    for col in columns(res):
        per_model = {mod: ranks(res, mod, col, methods) for mod in res["models"]}
        per_model = {k: v for k, v in per_model.items() if len(v) >= 2}
        if not per_model:
            continue
        mean_rank = {}
        for m in methods:
            r = [v[m] for v in per_model.values() if m in v]
            if r:
                mean_rank[m] = float(np.mean(r))
        taus = {}
        for a, b in combinations(per_model, 2):
            common = [m for m in methods if m in per_model[a] and m in per_model[b]]
            if len(common) >= 3:
                t = kendalltau([per_model[a][m] for m in common], [per_model[b][m] for m in common]).statistic
                if np.isfinite(t):
                    taus[f"{a} vs {b}"] = float(t)
        winners = {mod: min(v, key=v.get) for mod, v in per_model.items()}
        tv = list(taus.values())
        out[col] = {"direction": direction(res, col), "mean_rank": mean_rank,
                    "winner": min(mean_rank, key=mean_rank.get), "winner_per_model": winners,
                    "kendall_tau": taus, "mean_tau": float(np.mean(tv)) if tv else None,
                    "min_tau": min(tv) if tv else None,
                    "least_agreeing_pair": min(taus, key=taus.get) if taus else None}
    return out


def fmt(v) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return f"{v:.3g}" if a == 0 or 1e-3 <= a < 1e4 else f"{v:.2e}"


def model_table(res: dict, name: str) -> list[str]:
    m = res["models"][name]
    cols = [c for c in columns(res) if c in m["metrics"]]
    arrow = {"higher": "↑", "lower": "↓"}
    lines = ["| method | " + " | ".join(f"{c} {arrow[direction(res, c)]}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for meth in res["setup"]["methods"]:
        info = m["methods"].get(meth, {})
        if "error" in info:
            lines.append(f"| {meth} | " + " | ".join("failed" for _ in cols) + " |")
            continue
        cells = [fmt(m["metrics"][c][meth]["value"]) if meth in m["metrics"][c] else "-" for c in cols]
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return lines


def findings(res: dict) -> list[str]:
    """Sentences with numbers, computed from the analysis."""
    a = res["analysis"]
    if not a:
        return []
    wins: dict[str, list[str]] = {}
    for col, d in a.items():
        wins.setdefault(d["winner"], []).append(col)
    top = sorted(wins.items(), key=lambda kv: -len(kv[1]))
    s = [f"Over {len(res['models'])} models and {len(a)} metric columns, the best mean rank goes to "
         + "; ".join(f"{m} on {len(c)} column{'s' * (len(c) > 1)} ({', '.join(c)})" for m, c in top[:4]) + "."]
    taus = {c: d["mean_tau"] for c, d in a.items() if d["mean_tau"] is not None}
    if taus:
        hi = sorted(taus, key=taus.get, reverse=True)[:3]
        lo = sorted(taus, key=taus.get)[:3]
        s.append("The architectures agree most on the method ranking of "
                 + ", ".join(f"{c} (mean Kendall tau {taus[c]:.2f})" for c in hi)
                 + " and least on " + ", ".join(f"{c} ({taus[c]:.2f})" for c in lo) + ".")
        worst = min((d["min_tau"], c, d["least_agreeing_pair"]) for c, d in a.items() if d["min_tau"] is not None)
        s.append(f"The strongest disagreement is {worst[2]} on {worst[1]} (tau {worst[0]:.2f}).")
        allt = [t for d in a.values() for t in d["kendall_tau"].values()]
        s.append(f"Over all metric columns and model pairs the mean tau is {np.mean(allt):.2f} "
                 f"({np.mean(np.array(allt) < 0.5) * 100:.0f}% of pairs below 0.5).")
    same, other = [], []
    for d in a.values():
        for pair, t in d["kendall_tau"].items():
            x, y = (n.removesuffix("_keras").removesuffix("_jax") for n in pair.split(" vs "))
            (same if x == y else other).append(t)
    if same and other:
        s.append(f"The same architecture trained in another framework ranks the methods more alike (mean tau "
                 f"{np.mean(same):.2f} over {len(same)} metric x pair cases) than another architecture does "
                 f"({np.mean(other):.2f} over {len(other)}).")
    split = [c for c, d in a.items()
             if len(set(d["winner_per_model"].values())) >= max(3, len(d["winner_per_model"]) // 2)]
    if split:
        s.append(f"No single winner across the models on {len(split)} columns ("
                 + ", ".join(f"{c}: {len(set(a[c]['winner_per_model'].values()))} different winners" for c in split[:4])
                 + ").")
    return s


def plot_ranking(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = res["analysis"]
    cols = list(a)
    methods = res["setup"]["methods"]
    grid = np.full((len(methods), len(cols)), np.nan)
    for j, c in enumerate(cols):
        for i, m in enumerate(methods):
            grid[i, j] = a[c]["mean_rank"].get(m, np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(cols), 1.5 + 0.35 * len(methods)))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c} {'↑' if a[c]['direction'] == 'higher' else '↓'}" for c in cols],
                  rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    for i in range(len(methods)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] > np.nanmean(grid) else "black")
    fig.colorbar(im, ax=ax, label="mean rank over models (1 = best)")
    ax.set_title(f"Mean rank of each method per metric over {len(res['models'])} models")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def not_run(res: dict) -> list[str]:
    """Metrics with no value anywhere: refused by from_options, or failing on every model and
    method (with the distinct errors)."""
    cols = columns(res)
    reasons: dict[str, set[str]] = {}
    for m in res["models"].values():
        for k, why in m["skipped"].items():
            reasons.setdefault(k, set()).add(why)
        for k, per in m["errors"].items():
            if not any(c == k or c.startswith(k + ":") for c in cols):
                reasons.setdefault(k, set()).update(per.values())
    from onnxsal.metrics import base

    for k in base.names():  # registered, but not in the run's list (added to onnxsal since)
        if k not in res["setup"]["metrics"]:
            reasons.setdefault(k, set()).add("not in this run's metric list (`add --metrics` scores it)")
    return [f"- `{k}`: " + " / ".join(sorted(v)) for k, v in sorted(reasons.items())]


def partial(res: dict) -> list[str]:
    """Metrics an ``add --methods`` step scored on some methods only, and the metric options
    the add steps set."""
    lines = []
    gone: dict[str, dict[str, list[str]]] = {}
    for name, m in res["models"].items():
        for k, meths in m.get("unscored", {}).items():
            for meth in meths:
                gone.setdefault(k, {}).setdefault(meth, []).append(name)
    for k, per in sorted(gone.items()):
        lines.append(f"- `{k}`: not scored for " + ", ".join(
            meth + ("" if len(mods) == len(res["models"]) else f" (on {', '.join(mods)})")
            for meth, mods in per.items()))
    for st in res["setup"].get("added", []):
        if st.get("options"):
            lines.append(f"- `{st['metrics']}`" + (f" on {st['models']}" if st["models"] else "") + ": "
                         + ", ".join(f"{k}={v}" for k, v in st["options"].items()))
    return lines


def failures(res: dict) -> list[str]:
    """Method failures, and metric failures of metrics that ran elsewhere, grouped by error."""
    cols = columns(res)
    seen: dict[str, list[str]] = {}
    for name, m in res["models"].items():
        for meth, info in m["methods"].items():
            if "error" in info:
                seen.setdefault(info["error"], []).append(f"{name}, method {meth}")
        for k, per in m["errors"].items():
            if any(c == k or c.startswith(k + ":") for c in cols):
                for meth, e in per.items():
                    seen.setdefault(e, []).append(f"{name}, {meth}, {k}")
    return [f"- {'; '.join(where)}: {e}" for e, where in seen.items()]


def write_report(res: dict, out: Path) -> None:
    s = res["setup"]
    a = res["analysis"]
    train_seconds = sum(m["info"].get("train_seconds") or 0 for n, m in res["models"].items()
                        if "paper" not in MODELS.get(n, {}))
    if a:
        plot_ranking(res, out / "ranking.png")
    lines = ["# Cross-architecture benchmark: every model x method x metric on Fashion-MNIST", "",
             f"Generated by `benchmarks/cross_architecture.py` from `results.json`. {s['images']} Fashion-MNIST "
             f"test images (a fixed sample, seed {s['seed']}: `setup.test_indices`); each method explains the "
             "model's predicted class; metrics get the true labels. Arrows: ↑ higher is better, ↓ lower is better.",
             "", "Regenerate everything (1 thread per process; `train` skips models already trained, `evaluate` "
             "reuses the per-model parts under `parts/`, which are not committed; `add` recomputes the maps and "
             "scores only the metrics it is given, keeping the other columns):", "", "```",
             f"{COMMAND} train", f"{COMMAND} evaluate --images {s['images']}"
             + (f" --skip {s['skip']}" if s.get("skip") else "")]
    # columns computed later on the same sample by the add step (the other columns kept)
    lines += [add_command(st) for st in s.get("added", [])]
    lines += ["```", "",
             f"Machine: {s['machine']}, Python {s['python']}; "
             + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ". "
             f"Evaluation time: {s['evaluate_seconds_sum_of_parts']} s over all models "
             f"({s['evaluate_seconds_this_run']} s in the last run, which reuses unchanged parts); training of the "
             "models trained here: "
             f"{train_seconds:.0f}"
             " s. Wall-clock seconds on a 2-core machine shared with other jobs (load average 8-20 during this "
             "run; several models evaluated in parallel processes), so CPU time was lower.", "",
             "## Findings", ""]
    lines += [" ".join(findings(res)), "", "## Models", "",
              "Architectures (benchmarks/models/cross_architecture.py, benchmarks/models/paper_models.py): "
              "paper_cnn: conv 7x7 s2, max pool, three blocks of three 3x3 convs (32, 64, 128), global average "
              "pool, linear; resnet18: torchvision's ResNet-18, 1-channel stem; mobilenet: torchvision "
              "MobileNetV2 inverted residuals (16, 24, 32, 64 channels, 1280 last), stride-2 stem; convnext: "
              "patchify stem, 2+2 ConvNeXt blocks (depthwise 7x7, LayerNorm, GELU, layer scale) at 32 and 64 "
              "channels; vit: torchvision VisionTransformer, patch 4, 3 layers, 4 heads, width 64; mlp: "
              "784-256-128-10 with ReLU. *_keras and *_jax: the same paper CNN and MLP built and trained "
              "in Keras and flax (AdamW lr 1e-3, weight decay 0.01, batch 128, as the torch ones), exported by "
              "converters/keras_export.py and converters/jax_export.py. Models trained here saw a seeded subset "
              "of the training set; the paper models all 60000 images.", "",
              "| model | framework | trained on | epochs | test accuracy (10000) | accuracy on the sample | "
              "ONNX bytes | evaluate s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in res["models"].items():
        i = m["info"]
        acc = i.get("test_accuracy")
        n_done = len(m["methods"])
        if n_done < len(s["methods"]):
            name = f"{name} (partial: {n_done} of {len(s['methods'])} methods)"
        lines.append(f"| {name} | {i.get('framework', '?')} | {i.get('train_images', '?')} | {i.get('epochs', '?')} | "
                     f"{'n/a' if acc is None else f'{acc:.4f}'} | {m['accuracy_on_sample']:.3f} | "
                     f"{i.get('onnx_bytes', '?')} | {m['seconds']} |")
    lines += ["", "## Ranking", "", "![mean rank per method and metric](ranking.png)", "",
              "| metric | dir | best mean rank | winner per model | mean Kendall tau | least agreeing pair (tau) |",
              "|---|---|---|---|---:|---|"]
    for col, d in a.items():
        per = ", ".join(f"{k}: {v}" for k, v in d["winner_per_model"].items())
        pair = "n/a" if d["least_agreeing_pair"] is None else f"{d['least_agreeing_pair']} ({d['min_tau']:.2f})"
        lines.append(f"| {col} | {'↑' if d['direction'] == 'higher' else '↓'} | {d['winner']} "
                     f"({d['mean_rank'][d['winner']]:.1f}) | {per} | {fmt(d['mean_tau'])} | {pair} |")
    lines += ["", "## Metrics not run", ""] + (not_run(res) or ["none"])
    lines += ["", "Fashion-MNIST has no ground-truth object masks, so the localisation metrics have nothing to "
              "score against. Input invariance explains f2(x) = f(x - c) (the shift folded into the prepended "
              f"preprocessing, `Engine(input_shift=c)`) at x + c with c = {SHIFT}, with the method's own "
              "settings (a zero baseline stays 0). Grad-CAM explains at each model's default layer, the last "
              "4-D activation with an image layout before the pooling: for the ViT that is the patch "
              "embedding (its other 4-D tensors are attention's, with tokens and heads on their axes); the "
              "`add --models vit --methods gradcam` steps scored it at that layer."]
    more = partial(res)
    if more:
        lines += ["", "## Metrics on some methods only, and their options", "",
                  "Re-explaining each image tens of times (the robustness metrics, the smooth and efficient "
                  "MPRTs) costs that many times the method's own time (`methods.*.seconds` in results.json): "
                  "for the perturbation and surrogate methods (occlusion, RISE, LIME, anchor) that is hours "
                  "per model here, so those columns score the gradient-based methods only, with fewer samples "
                  "than the metrics' defaults:", ""] + more
    lines += ["", "## Failures (model, method, metric: error; one line per distinct error)", ""]
    lines += failures(res) or ["none"]
    for name in res["models"]:
        lines += ["", f"## {name}", ""] + model_table(res, name)
    (out / "README.md").write_text("\n".join(lines) + "\n")


def cmd_report(args) -> None:
    """Rebuild results.json, the plot and the README from the parts under ``<out>/parts/``
    (complete or not: a model's missing methods show as '-'), without computing anything."""
    from onnxsal import methods as M

    out = Path(args.out)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))}
    order = [n for n in MODELS if n in parts] + [n for n in parts if n not in MODELS]
    parts = {n: parts[n] for n in order}
    if not parts:
        raise SystemExit(f"no parts under {out / 'parts'}: run the evaluate step")
    first = next(iter(parts.values()))["settings"]
    done = {m for r in parts.values() for m in r["methods"]}
    methods = [m for m in M.names() if m in done]
    skip = ",".join(f"{n}:{k}" for n, r in parts.items() for k in r["settings"].get("skipped_for_time", []))
    ns = argparse.Namespace(images=first["images"], seed=first["seed"], skip=skip)
    _, _, idx = sample(first["images"], first["seed"])
    result = assemble(parts, out, ns, methods, first["metrics"], idx, 0.0)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(result, out)


def cmd_add(args) -> None:
    """(Re)compute the columns of ``--metrics`` for the models of the committed results.json
    (all, or ``--models``), keep every other column, and rewrite results.json and the README;
    the sample, methods and settings are those of results.json. A metric added to a model it
    was skipped on for time leaves the skip list."""
    out = Path(args.out)
    res = json.loads((out / "results.json").read_text())
    setup = res["setup"]
    add = _names(args.metrics)
    for k in add:
        from onnxsal.metrics import base

        base.get(k)
    only = _names(args.methods) or None
    for m in only or []:
        if m not in setup["methods"]:
            raise SystemExit(f"--methods: {m!r} is not a method of results.json ({', '.join(setup['methods'])})")
    options = dict(parse_option(o) for o in args.set or [])
    for k in add if only else []:  # the kept scores of the other methods must share the options
        made = column_options(setup, k)
        if k in setup["metrics"] and made != options:
            raise SystemExit(f"--methods keeps the other methods' {k} scores, made with options "
                             f"{made or 'none'}; pass the same --set options, or omit --methods")
    x, y, idx = sample(setup["images"], setup["seed"])
    names = _names(args.models) or list(res["models"])
    parts = {}
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for name, m in res["models"].items():
        part = {k: v for k, v in m.items() if k != "info"}
        part["settings"] = {"model": name, "file_sha256_16": file_hash(str(ROOT / m["file"])),
                            "images": setup["images"], "seed": setup["seed"],
                            "metrics": list(dict.fromkeys(setup["metrics"] + add)),
                            "skipped_for_time": [k for item in _names(setup.get("skip")) for mod, _, k
                                                 in [item.partition(":")] if mod == name and k not in add]}
        if name in names:
            print(f"{name}: adding {', '.join(add)}", flush=True)
            t0 = time.perf_counter()
            add_metrics(str(ROOT / m["file"]), x, y, add, part, log=lambda s: print(s, flush=True),
                        methods=only, metric_options=options)
            part["seconds"] = round(part["seconds"] + time.perf_counter() - t0, 1)
        (out / "parts" / f"{name}.json").write_text(json.dumps(part, indent=1))  # for `report`
        parts[name] = part
    skip = ",".join(f"{n}:{k}" for n, p in parts.items() for k in p["settings"]["skipped_for_time"])
    ns = argparse.Namespace(images=setup["images"], seed=setup["seed"], skip=skip)
    metrics = list(dict.fromkeys(setup["metrics"] + add))
    result = assemble(parts, out, ns, setup["methods"], metrics, idx, 0.0)
    result["setup"]["skip"] = setup.get("skip", "")  # the evaluate step's, for its command
    step = {"models": ",".join(names) if args.models else "", "metrics": ",".join(add)}
    if only:
        step["methods"] = ",".join(only)
    if options:
        step["options"] = options
    result["setup"]["added"] = setup.get("added", []) + [step]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(result, out)


def column_options(setup: dict, metric: str) -> dict:
    """The ``--set`` options of the last step that scored ``metric`` ({} for the evaluate step)."""
    opts: dict = {}
    for step in setup.get("added", []):
        if metric in _names(step["metrics"]):
            opts = step.get("options", {})
    return opts


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``add --set``: the value read as JSON (numbers, lists), else as text."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE, e.g. sensitivity_samples=10")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_command(step: dict) -> str:
    """The ``add`` command line of a recorded step of ``setup.added``."""
    return (f"{COMMAND} add" + (f" --models {step['models']}" if step["models"] else "")
            + f" --metrics {step['metrics']}" + (f" --methods {step['methods']}" if step.get("methods") else "")
            + "".join(f" --set {k}={json.dumps(v)}" for k, v in step.get("options", {}).items()))


def _names(s: str | None) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()] if s else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    t = sub.add_parser("train", help="train and export the models not trained yet")
    t.add_argument("--models", help="comma-separated names (default: all trained here)")
    t.add_argument("--train", type=int, default=20000, help="training images (a seeded subset)")
    t.add_argument("--force", action="store_true")
    e = sub.add_parser("evaluate", help="every model x method x metric")
    e.add_argument("--models", help="comma-separated NAME or NAME=PATH.onnx (default: all)")
    e.add_argument("--methods", help="comma-separated (default: all registered)")
    e.add_argument("--metrics", help="comma-separated (default: all registered)")
    e.add_argument("--images", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--force", action="store_true", help="recompute parts whose settings match")
    e.add_argument("--skip", help="comma-separated MODEL:METRIC pairs not to run (for time; recorded)")
    sub.add_parser("report", help="rewrite the analysis, plot and README from results.json")
    a = sub.add_parser("add", help="(re)compute some metric columns of the committed results.json")
    a.add_argument("--models", help="comma-separated names (default: all in results.json)")
    a.add_argument("--metrics", required=True, help="comma-separated metric names")
    a.add_argument("--methods", help="comma-separated: score only these methods on the metrics (the others "
                                     "keep their scores, or are recorded as not scored; default: all)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a metric option, e.g. sensitivity_samples=10 (repeatable; recorded)")
    for p in (t, e, sub.choices["report"], a):
        p.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    {"train": cmd_train, "evaluate": cmd_evaluate, "report": cmd_report, "add": cmd_add}[args.step](args)


if __name__ == "__main__":
    main()
