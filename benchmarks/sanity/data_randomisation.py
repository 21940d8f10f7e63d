"""Data randomisation test of Adebayo et al. (2018; docs/definitions.md#sanity-checks) on Fashion-MNIST.

Two copies of the paper's CNN (benchmarks.models.paper_models, 1 channel, 28x28) are trained with the
paper's recipe (AdamW lr 1e-3, weight decay 0.01, batch 128, seed 42) on the same training
subset: one on the true labels, one on a permutation of them. Each trains until it fits its
training set (train accuracy >= --fit) or --max-epochs. Both are exported to ONNX and each
method's maps of test images (each model explaining its own predicted class) are compared
with onnxsal.sanity_run.compare_models: a method whose maps stay similar when the labels carry
no information does not reflect what the model learned.

A subset is used because fitting random labels of all 60k images takes far longer than a
2-core CPU allows (the paper's point needs only a model that has memorised noise).

    nice -n 10 python benchmarks/sanity/data_randomisation.py --train-size 2000 \
        --out benchmarks/results/sanity/data_randomisation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.models.paper_models import build  # noqa: E402
from benchmarks.models.training import evaluate, load_fashion_mnist_nchw  # noqa: E402
from onnxsal.data import FASHION_MNIST_CLASSES  # noqa: E402

METHODS = ["vanilla", "original", "gradient_x_input", "integrated_gradients", "smoothgrad",
           "guided_backprop", "gradcam"]


def fit(model, x, y, x_test, y_test, fit_acc: float, max_epochs: int, seed: int = 42, log=print):
    """The paper's recipe, epoch by epoch until the training set is fitted."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    hist = []
    t0 = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        train_acc = evaluate(model, x, y)
        rec = {"epoch": epoch, "loss": tot / len(x), "train_accuracy": train_acc}
        hist.append(rec)
        if epoch % 10 == 0 or train_acc >= fit_acc:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
        if train_acc >= fit_acc:
            break
    model.eval()
    return {"epochs": len(hist), "train_accuracy": hist[-1]["train_accuracy"],
            "test_accuracy": evaluate(model, x_test, y_test), "seconds": time.perf_counter() - t0,
            "fitted": hist[-1]["train_accuracy"] >= fit_acc, "history": hist}


def plot_maps(res: dict, x: np.ndarray, path: Path, n_images: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxsal.metrics.similarity import normalize_abs
    from onnxsal.sanity_report import save_fig

    methods = list(res["methods"])
    cols = 1 + 2 * n_images
    fig, axes = plt.subplots(len(methods), cols, figsize=(1.3 * cols, 1.4 * len(methods) + 0.5), squeeze=False)
    for r, m in enumerate(methods):
        for j in range(n_images):
            for k, key in enumerate(("reference", "other")):
                ax = axes[r, 1 + 2 * j + k]
                ax.imshow(normalize_abs(res["maps"][key][m][j]), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(f"img {j}: {'true' if key == 'reference' else 'random'}", fontsize=6)
        ax = axes[r, 0]
        ax.imshow(x[r % n_images, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(m, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("data randomisation: maps of the true-label model vs the permuted-label model", fontsize=9)
    save_fig(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--fit", type=float, default=0.99, help="train accuracy that counts as fitted")
    ap.add_argument("--max-epochs", type=int, default=300)
    ap.add_argument("--images", type=int, default=64, help="test images compared")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(HERE.parents[0] / "results" / "sanity" / "data_randomisation"))
    ap.add_argument("--models", default=str(HERE / "models"), help="where the ONNX files go")
    args = ap.parse_args()

    import torch

    from converters.torch_export import export
    from onnxsal.report import atomic_write_json, atomic_write_text, markdown_table
    from onnxsal.sanity_run import compare_models

    torch.set_num_threads(args.threads)
    out, mdir = Path(args.out), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_fashion_mnist_nchw()
    rng = np.random.default_rng(args.seed)
    sub = np.sort(rng.choice(len(xtr), args.train_size, replace=False))
    x, y = np.ascontiguousarray(xtr[sub]), ytr[sub]
    y_perm = rng.permutation(y)  # same class counts, no relation to the images
    training = {}
    paths = {}
    for key, labels in (("true", y), ("permuted", y_perm)):
        path = mdir / f"fashion_cnn_{key}_labels_{args.train_size}.onnx"
        logf = mdir / f"fashion_cnn_{key}_labels_{args.train_size}.json"
        if path.is_file() and logf.is_file():
            training[key] = json.loads(logf.read_text())
            print(key, "reusing", path, flush=True)
        else:
            torch.manual_seed(args.seed)
            model = build("cnn", 10, 1)
            print(f"training on {key} labels ({len(x)} images)", flush=True)
            training[key] = fit(model, x, labels, xte, yte, args.fit, args.max_epochs, args.seed,
                                log=lambda s, k=key: print(k, s, flush=True))
            export(model, (1, 28, 28), path, opset=17, labels=FASHION_MNIST_CLASSES,
                   preprocess={"scale": 1.0, "mean": [0.0], "std": [1.0]})
            logf.write_text(json.dumps(training[key], indent=2))
        paths[key] = path
        t = training[key]
        print(f"{key}: {t['epochs']} epochs, train acc {t['train_accuracy']:.4f}, test acc "
              f"{t['test_accuracy']:.4f}", flush=True)

    methods = [m for m in args.methods.split(",") if m]
    imgs = np.ascontiguousarray(xte[:args.images])
    t0 = time.perf_counter()
    res = compare_models(str(paths["true"]), str(paths["permuted"]), imgs, methods, device="cpu",
                         threads=args.threads)
    secs = time.perf_counter() - t0
    summary = {
        "test": "data randomisation (Adebayo et al. 2018)", "data": "Fashion-MNIST",
        "train_subset": args.train_size, "fit_threshold": args.fit, "seed": args.seed,
        "images": len(imgs), "model": "paper CNN (benchmarks.models.paper_models, 1 channel)",
        "training": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in training.items()},
        "class_agreement": res["class_agreement"], "methods": res["methods"],
        "per_image": res["per_image"], "seconds": secs,
        "command": " ".join(["python"] + sys.argv),
    }
    atomic_write_json(out / "data_randomisation.json", summary)
    rows = []
    for m in methods:
        d = res["methods"][m]
        rows.append([m] + [f"{d[k]['mean']:.3f} ({d[k]['std']:.3f})" if d[k]["mean"] is not None
                           else "n/a" for k in ("spearman_abs", "spearman_signed", "ssim", "hog")])
    tr = training
    md = [
        "# Data randomisation test (Adebayo et al. 2018) on Fashion-MNIST\n",
        f"Paper CNN, trained with the paper's recipe on the same {args.train_size} training images "
        f"with true labels and with permuted labels, each until train accuracy >= {args.fit} "
        f"(or {args.max_epochs} epochs).\n",
        markdown_table(["labels", "epochs", "train accuracy", "test accuracy", "fitted"],
                       [[k, tr[k]["epochs"], f"{tr[k]['train_accuracy']:.4f}",
                         f"{tr[k]['test_accuracy']:.4f}", tr[k]["fitted"]] for k in tr], "lrrrl"),
        f"\nSimilarity of each method's maps (true-label model vs permuted-label model, each "
        f"explaining its own predicted class) on the first {len(imgs)} test images: mean (std). "
        f"Low similarity = the map depends on what the model learned. The two models predict the "
        f"same class on {res['class_agreement']:.0%} of these images.\n",
        markdown_table(["method", "Spearman (abs)", "Spearman (signed)", "SSIM", "HOG (Pearson)"], rows),
        "".join(f"\nNote: every {m} map of both models is constant (no spatial information; "
                "for Grad-CAM the default layer of this CNN at 28x28 is 1x1), so the similarity is "
                "1 by convention: the method cannot depend on the model here.\n"
                for m in methods if all(np.ptp(a) == 0 for k in ("reference", "other")
                                        for a in res["maps"][k][m])),
        "\n![maps](data_randomisation_maps.png)\n",
        f"Command: `{summary['command']}` ({secs:.0f} s for the maps).\n",
    ]
    atomic_write_text(out / "data_randomisation.md", "\n".join(md))
    plot_maps(res, imgs, out / "data_randomisation_maps.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
