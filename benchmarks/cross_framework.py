"""Cross-framework check (issue 6): one small CNN, the same weights in PyTorch, Keras and JAX/flax,
exported by each converter; do the three ONNX files give the same logits, gradients and maps
through onnxsal, and do the gradients equal each framework's own autodiff?

The CNN (benchmarks/models/cross_framework_cnn.py) is trained briefly in PyTorch on Fashion-MNIST, its
weights copied to Keras and flax (OIHW -> HWIO, dense transposed), and each model exported with
the normalisation (mean 0.2860, std 0.3530) recorded as metadata, so onnxsal differentiates
w.r.t. the [0, 1] pixels. Results: benchmarks/results/cross_framework.{md,json}.

    python benchmarks/cross_framework.py [--images 64] [--map-images 32] [--train 20000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import cross_framework_cnn as cf  # noqa: E402

FRAMEWORKS = ("torch", "keras", "jax")
MEAN, STD = 0.2860, 0.3530
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def train(n: int, epochs: int, seed: int = 0) -> tuple[dict, float]:
    """Train the torch CNN on n Fashion-MNIST training images; return weights and test accuracy."""
    import torch

    from onnxsal.data import load_dataset

    torch.manual_seed(seed)
    tr = load_dataset("fashion-mnist:train", shape=(1, 28, 28), limit=n)
    te = load_dataset("fashion-mnist:test", shape=(1, 28, 28), limit=2000)
    m = cf.torch_cnn(cf.random_weights(1, 10, seed)).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    xs = torch.from_numpy(cf.normalize(tr.images, MEAN, STD))
    ys = torch.from_numpy(tr.labels.astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(xs[idx]), ys[idx]).backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = float((m(torch.from_numpy(cf.normalize(te.images, MEAN, STD))).argmax(1).numpy()
                     == te.labels).mean())
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, acc


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--map-images", type=int, default=32)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import onnx
    import torch

    from onnxsal import methods as M
    from onnxsal.compare import compare_models
    from onnxsal.data import load_dataset
    from onnxsal.engine import Engine
    from onnxsal.metrics.similarity import spearman

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    weights, acc = train(args.train, args.epochs)
    t_train = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="xf_"))
    pre = {"scale": 1.0, "mean": [MEAN], "std": [STD]}
    t0 = time.perf_counter()
    paths = cf.export_all(weights, 28, 28, tmp, preprocess=pre, labels=CLASSES)
    t_export = time.perf_counter() - t0
    files = {}
    for f, p in paths.items():
        m = onnx.load(p)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        files[f] = {"opset": m.opset_import[0].version, "ir_version": m.ir_version,
                    "producer": f"{m.producer_name} {m.producer_version}".strip(), "nodes": len(m.graph.node),
                    "ops": ops}
    engines = {f: Engine(p, device="cpu", threads=1) for f, p in paths.items()}
    data = load_dataset("fashion-mnist:test", shape=(1, 28, 28), limit=args.images)
    x, labels = data.images, data.labels
    targets = engines["torch"].predict(x)

    own = cf.framework_gradients(weights, x, targets, MEAN, STD)
    onnx_res = {f: engines[f].gradient(x, targets) for f in FRAMEWORKS}
    rows_self = []
    for f in FRAMEWORKS:
        lo, go = own[f]
        le, ge = onnx_res[f]
        rows_self.append({"framework": f, "max_abs_logit_diff": float(np.abs(le - lo).max()),
                          "max_abs_grad_diff": float(np.abs(ge - go).max()),
                          "max_rel_grad_diff": rel(ge, go), "grad_scale": float(np.abs(go).max()),
                          "accuracy": float((le.argmax(1) == labels).mean())})
    rows_pair = []
    for a, b in itertools.combinations(FRAMEWORKS, 2):
        rows_pair.append({
            "pair": f"{a} vs {b}",
            "onnx_logit_diff": float(np.abs(onnx_res[a][0] - onnx_res[b][0]).max()),
            "onnx_grad_diff": float(np.abs(onnx_res[a][1] - onnx_res[b][1]).max()),
            "framework_logit_diff": float(np.abs(own[a][0] - own[b][0]).max()),
            "framework_grad_diff": float(np.abs(own[a][1] - own[b][1]).max()),
            "top1_agreement": float((onnx_res[a][0].argmax(1) == onnx_res[b][0].argmax(1)).mean()),
        })

    xm = x[:args.map_images]
    tm = targets[:args.map_images]
    names = M.names()
    maps, seconds = {}, {}
    for f in FRAMEWORKS:
        t0 = time.perf_counter()
        maps[f] = M.compute(engines[f], xm, names, targets=tm, seed=0)
        seconds[f] = time.perf_counter() - t0
    rows_maps = []
    for name in names:
        ref = maps["torch"][name].maps
        worst_abs, worst_rel, min_rho = 0.0, 0.0, 1.0
        for a, b in itertools.combinations(FRAMEWORKS, 2):
            ma, mb = maps[a][name].maps, maps[b][name].maps
            worst_abs = max(worst_abs, float(np.abs(ma - mb).max()))
            worst_rel = max(worst_rel, rel(ma, mb))
            min_rho = min(min_rho, min(spearman(ma[i], mb[i]) for i in range(len(ma))))
        rows_maps.append({"method": name, "map_scale": float(np.abs(ref).max()),
                          "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
                          "min_spearman": min_rho})
    verdicts = {}
    for b in ("keras", "jax"):
        rep = compare_models(engines["torch"], engines[b], x, ["vanilla", "gradcam", "integrated_gradients"])
        verdicts[f"torch vs {b}"] = rep["verdict"]

    import jax
    import keras
    import tensorflow as tf
    import tf2onnx

    res = {
        "setup": {"images": int(len(x)), "map_images": int(len(xm)), "train_images": args.train,
                  "epochs": args.epochs, "test_accuracy_torch_2000": acc,
                  "train_seconds": round(t_train, 1), "export_seconds_all_three": round(t_export, 1),
                  "map_seconds": {f: round(s, 1) for f, s in seconds.items()},
                  "versions": {"torch": torch.__version__, "tensorflow": tf.__version__,
                               "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                               "jax": jax.__version__, "jax2onnx": importlib.metadata.version("jax2onnx"),
                               "onnx": onnx.__version__},
                  "machine": platform.machine(), "python": platform.python_version()},
        "files": files, "self": rows_self, "pairs": rows_pair, "maps": rows_maps,
        "compare_verdicts": verdicts,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross_framework.json").write_text(json.dumps(res, indent=2))
    (out / "cross_framework.md").write_text(markdown(res))
    print(markdown(res))


def markdown(r: dict) -> str:
    s = r["setup"]
    v = s["versions"]
    lines = [
        "# Cross-framework: one CNN, the same weights, three converters",
        "",
        "`python benchmarks/cross_framework.py` (benchmarks/models/cross_framework_cnn.py). CNN: conv 3x3 (1->8), "
        "ReLU, max pool 2, conv 3x3 (8->16), ReLU, global average pool, dense (16->10); trained "
        f"in PyTorch on {s['train_images']} Fashion-MNIST images for {s['epochs']} epochs (test "
        f"accuracy {s['test_accuracy_torch_2000']:.3f} on 2000), weights copied to Keras and flax "
        "(conv OIHW -> HWIO, dense transposed). Each framework's model exported by its converter "
        "with the normalisation recorded as metadata; onnxsal differentiates w.r.t. the [0, 1] "
        f"pixels. {s['images']} Fashion-MNIST test images ({s['map_images']} for the maps). "
        f"torch {v['torch']}, TensorFlow {v['tensorflow']}, Keras {v['keras']}, tf2onnx "
        f"{v['tf2onnx']}, JAX {v['jax']}, jax2onnx {v['jax2onnx']}, onnx {v['onnx']}.",
        "",
        "## The three ONNX files",
        "",
        "| from | opset | IR | nodes | operators |",
        "|---|---:|---:|---:|---|",
    ]
    for f, d in r["files"].items():
        ops = ", ".join(f"{k} {n}" for k, n in d["ops"].items())
        lines.append(f"| {f} | {d['opset']} | {d['ir_version']} | {d['nodes']} | {ops} |")
    lines += ["", "## onnxsal against each framework's own autodiff",
              "(torch.autograd, tf.GradientTape, jax.grad of logit[target] w.r.t. the [0, 1] "
              "pixels through the normalisation; targets: torch's predicted class)", "",
              "| framework | max abs logit diff | max abs grad diff | max rel grad diff | grad scale | accuracy |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in r["self"]:
        lines.append(f"| {row['framework']} | {row['max_abs_logit_diff']:.2e} | "
                     f"{row['max_abs_grad_diff']:.2e} | {row['max_rel_grad_diff']:.2e} | "
                     f"{row['grad_scale']:.3g} | {row['accuracy']:.3f} |")
    lines += ["", "## Between frameworks", "",
              "| pair | top-1 agreement | ONNX logit diff | ONNX grad diff | framework logit diff "
              "| framework grad diff |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in r["pairs"]:
        lines.append(f"| {row['pair']} | {row['top1_agreement']:.3f} | {row['onnx_logit_diff']:.2e} | "
                     f"{row['onnx_grad_diff']:.2e} | {row['framework_logit_diff']:.2e} | "
                     f"{row['framework_grad_diff']:.2e} |")
    lines += ["", "## Maps through onnxsal (worst pair of the three files)", "",
              "| method | map scale | max abs diff | max rel diff | min Spearman (per image) |",
              "|---|---:|---:|---:|---:|"]
    for row in r["maps"]:
        lines.append(f"| {row['method']} | {row['map_scale']:.3g} | {row['max_abs_diff']:.2e} | "
                     f"{row['max_rel_diff']:.2e} | {row['min_spearman']:.4f} |")
    lines += ["", "## `onnxsal compare` verdicts", ""]
    for k, val in r["compare_verdicts"].items():
        lines.append(f"- {k}: {val}")
    lines += ["", f"Timing: training {s['train_seconds']} s, exporting all three "
              f"{s['export_seconds_all_three']} s, all maps per file "
              + ", ".join(f"{f} {t} s" for f, t in s["map_seconds"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
