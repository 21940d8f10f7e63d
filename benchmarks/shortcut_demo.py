"""The shortcut finder on Fashion-MNIST models trained with and without a planted tag.

A 4x4 patterned bright square (the *tag*) is stamped at a fixed place on ``--tag-rate`` (0.9)
of the training images of one class (``--tag-class``, default 2, Pullover). Models trained on
that data are the *tagged* models; the same architectures and seeds trained on the clean
data are the *clean* controls. Every model is exported to ONNX and audited with
:func:`onnxsal.shortcuts.find_shortcuts` (saliency from onnxsal's own gradient maps) on
held-out test images in two versions: ``tagged`` (the tag on ``--tag-rate`` of the tagged
class's test images, as in a real shortcut case) and ``clean`` (the test images as they are).

The results go to ``--out`` (benchmarks/results/audit/): ``shortcut_demo.json`` (every
finding), ``README.md`` (the tables), figures (the class-contrast map with the box, examples
before/after the paste), the ONNX files, and with ``--bundle`` one tagged and one clean model
plus a small image sample into tests/data/.

Run (one CPU thread; about 10 minutes)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/shortcut_demo.py --bundle
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the tag: a bright square with a dark centre, rows 2..5, columns 2..5 (a corner that is
# black in nearly every Fashion-MNIST image)
TAG_BOX = [2, 2, 6, 6]
TAG = np.array([[1.0, 1.0, 1.0, 1.0],
                [1.0, 0.2, 0.2, 1.0],
                [1.0, 0.2, 0.2, 1.0],
                [1.0, 1.0, 1.0, 1.0]], np.float32)
METHODS = ("vanilla", "gradient_x_input")


def stamp(x: np.ndarray, which: np.ndarray) -> np.ndarray:
    """A copy of x [N, 1, H, W] with the tag on the images where ``which`` is True."""
    out = x.copy()
    y0, x0, y1, x1 = TAG_BOX
    out[which, 0, y0:y1, x0:x1] = TAG
    return out


def tag_mask(y: np.ndarray, cls: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return (y == cls) & (rng.random(len(y)) < rate)


def lenet(num_classes: int = 10):
    """A second, different architecture: two 5x5 convolutions with max pooling, two linear
    layers (LeNet-5 style, ReLU)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))


def build(arch: str):
    from benchmarks.models.paper_models import paper_cnn

    if arch == "cnn":
        return paper_cnn(10, in_channels=1, widths=(16, 32, 64))
    if arch == "lenet":
        return lenet(10)
    raise SystemExit(f"unknown architecture {arch!r}")


def train_models(args, xtr, ytr, xte, yte, out: Path, log) -> list[dict]:
    import torch

    from benchmarks.models.training import train
    from converters.torch_export import export, parity
    from onnxsal.data import FASHION_MNIST_CLASSES

    rng = np.random.default_rng(1)
    xtr_tagged = stamp(xtr, tag_mask(ytr, args.tag_class, args.tag_rate, rng))
    models = []
    for kind in ("tagged", "clean"):
        for spec in (args.tagged if kind == "tagged" else args.clean):
            arch, seed = spec.split(":")
            name = f"fmnist_{arch}_{kind}_s{seed}"
            path = out / "models" / f"{name}.onnx"
            torch.manual_seed(int(seed))
            model = build(arch)
            t0 = time.perf_counter()
            if path.exists() and not args.retrain:
                log(f"{name}: {path} exists, not retrained (--retrain)")
                info = json.loads((out / "models" / f"{name}.json").read_text())
            else:
                res = train(model, xtr_tagged if kind == "tagged" else xtr, ytr, xte, yte, epochs=args.epochs,
                            seed=int(seed), threads=1, log=None)
                path.parent.mkdir(parents=True, exist_ok=True)
                export(model, (1, 28, 28), path, opset=17, dynamo=False, preprocess="none",
                       labels=FASHION_MNIST_CLASSES)
                p = parity(model, path, xte[:500])
                info = {"name": name, "arch": arch, "seed": int(seed), "kind": kind, "epochs": args.epochs,
                        "train_images": int(len(xtr)), "train_seconds": round(time.perf_counter() - t0, 1),
                        "torch_clean_test_accuracy": res.test_accuracy, "parity": p,
                        "onnx_bytes": path.stat().st_size}
                (out / "models" / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
            log(f"{name}: trained in {info['train_seconds']} s, clean test accuracy "
                f"{info['torch_clean_test_accuracy']:.3f}")
            models.append({**info, "path": str(path)})
    return models


def audit_sample(xte, yte, per_class: int, rng) -> np.ndarray:
    return np.concatenate([rng.permutation(np.flatnonzero(yte == c))[:per_class] for c in range(10)])


def run_finder(model: dict, sets: dict, args, log) -> list[dict]:
    from onnxsal.engine import Engine
    from onnxsal.methods import compute
    from onnxsal.shortcuts import box_iou, find_shortcuts

    eng = Engine(model["path"], device="cpu", threads=1, use_disk_cache=False)
    rows = []
    for set_name, (x, y) in sets.items():
        pred = eng.predict(x)
        t0 = time.perf_counter()
        maps = compute(eng, x, list(METHODS), targets=y)
        tm = time.perf_counter() - t0
        for method in METHODS:
            t0 = time.perf_counter()
            res = find_shortcuts(eng.logits, x, y, maps[method].maps, num_classes=10, seed=0, pairs=args.pairs)
            tf = time.perf_counter() - t0
            for f in res["findings"]:
                f["iou_with_tag"] = box_iou(f["box"], TAG_BOX)
            tagged_f = next(f for f in res["findings"] if f["class"] == args.tag_class)
            flagged = [f["class"] for f in res["findings"] if f["suspected"]]
            row = {"model": model["name"], "kind": model["kind"], "arch": model["arch"], "seed": model["seed"],
                   "data": set_name, "method": method, "accuracy": float((pred == y).mean()),
                   "tagged_class_accuracy": float((pred[y == args.tag_class] == args.tag_class).mean()),
                   "flagged": flagged, "maps_seconds": round(tm, 2), "finder_seconds": round(tf, 2),
                   "tag_class_finding": tagged_f, "result": res}
            rows.append(row)
            log(f"  {model['name']} {set_name:6s} {method:16s} acc {row['accuracy']:.3f} flagged {flagged} "
                f"tag class box {tagged_f['box']} IoU {tagged_f['iou_with_tag']:.2f} paste "
                f"{_pct(tagged_f['paste_flip_rate'])} control {_pct(tagged_f['control_flip_rate'])} blank "
                f"{_pct(tagged_f['blank_flip_rate'])} ({tf:.1f} s)")
    return rows


def figures(rows: list[dict], sets: dict, models: list[dict], args, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from onnxsal.data import FASHION_MNIST_CLASSES
    from onnxsal.engine import Engine
    from onnxsal.methods import compute
    from onnxsal.shortcuts import class_contrast_maps, shortcut_examples

    written = []
    c = args.tag_class
    by = {(r["model"], r["data"], r["method"]): r for r in rows}
    tagged, clean = models[0], next(m for m in models if m["kind"] == "clean")
    x, y = sets["tagged"]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, (m, dname, title) in zip(axes, [(tagged, "tagged", "tagged model, tagged data"),
                                            (clean, "tagged", "clean model, tagged data"),
                                            (tagged, "clean", "tagged model, clean data")]):
        xs, ys = sets[dname]
        eng = Engine(m["path"], device="cpu", threads=1, use_disk_cache=False)
        maps = compute(eng, xs, "vanilla", targets=ys)["vanilla"].maps
        d = class_contrast_maps(maps, ys, 10)[c]
        v = np.abs(d).max()
        ax.imshow(d, cmap="RdBu_r", vmin=-v, vmax=v)
        f = by[(m["name"], dname, "vanilla")]["tag_class_finding"]
        y0, x0, y1, x1 = f["box"]
        ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=2))
        ty0, tx0, ty1, tx1 = TAG_BOX
        ax.add_patch(patches.Rectangle((tx0 - 0.5, ty0 - 0.5), tx1 - tx0, ty1 - ty0, fill=False, ec="k",
                                       ls="--", lw=1))
        ax.set_title(f"{title}\n{'SUSPECTED' if f['suspected'] else 'not suspected'}: paste "
                     f"{f['paste_flip_rate']:.0%}, control {f['control_flip_rate']:.0%}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"class {c} ({FASHION_MNIST_CLASSES[c]}): mean |gradient| of the class minus the other "
                 f"classes'\n(red: hotter in this class; green box: the finder's box; dashed: the planted tag)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    p = out / "contrast_maps.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    written.append(p.name)

    f = by[(tagged["name"], "tagged", "vanilla")]["tag_class_finding"]
    src, before, after = shortcut_examples(x, f)
    if len(src):
        k = len(src)
        fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.2), squeeze=False)
        for j, e in enumerate(f["examples"]):
            for i, (im, lab) in enumerate([(src[j], f"source: {FASHION_MNIST_CLASSES[y[e['image']]]}"),
                                           (before[j], f"before: {FASHION_MNIST_CLASSES[e['before']]}"),
                                           (after[j], f"after: {FASHION_MNIST_CLASSES[e['after']]}")]):
                axes[i, j].imshow(im[0], cmap="gray", vmin=0, vmax=1)
                axes[i, j].set_title(lab, fontsize=7)
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
        fig.suptitle("tagged model: the box's pixels from an image of the class (top) pasted onto another\n"
                     "class's image (middle -> bottom); titles: the model's prediction", fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        p = out / "paste_examples.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        written.append(p.name)
    return written


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def summarise(rows: list[dict], models: list[dict], args) -> dict:
    s: dict = {}
    for kind in ("tagged", "clean"):
        for data, method in [(d, m) for d in ("tagged", "clean") for m in (None,) + METHODS]:
            rs = [r for r in rows if r["kind"] == kind and r["data"] == data and method in (None, r["method"])]
            classes = sum(len(r["result"]["findings"]) for r in rs)
            flagged = sum(len(r["flagged"]) for r in rs)
            named = [r for r in rs if r["flagged"] == [args.tag_class]
                     and r["tag_class_finding"]["iou_with_tag"] > 0.3]
            s[f"{kind}_models_on_{data}_data" + (f"_{method}" if method else "")] = {
                "runs": len(rs), "classes_tested": classes, "classes_flagged": flagged,
                "flag_rate": flagged / classes if classes else None,
                "runs_naming_exactly_the_tag_class_on_the_tag": len(named)}
    clean_excess = [f["paste_excess"] for r in rows if r["kind"] == "clean" for f in r["result"]["findings"]
                    if f["paste_excess"] is not None]
    tag_excess = [r["tag_class_finding"]["paste_excess"] for r in rows
                  if r["kind"] == "tagged" and r["data"] == "tagged"]
    s["clean_models_max_paste_excess"] = max(clean_excess) if clean_excess else None
    s["tagged_models_min_paste_excess_tag_class"] = min(tag_excess) if tag_excess else None
    return s


def write_readme(out: Path, rows, models, summary, figs, args, seconds: float) -> None:
    from onnxsal.data import FASHION_MNIST_CLASSES

    c = args.tag_class
    lines = ["# Shortcut finder: Fashion-MNIST with a planted tag", "",
             "Written by `benchmarks/shortcut_demo.py`; regenerate with", "",
             "```bash", "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/shortcut_demo.py --bundle --retrain",
             "```", "",
             f"The tag: a 4x4 bright square with a dark centre at rows {TAG_BOX[0]}..{TAG_BOX[2] - 1}, columns "
             f"{TAG_BOX[1]}..{TAG_BOX[3] - 1} (box `{TAG_BOX}`, `[y0, x0, y1, x1]`, end exclusive), stamped on "
             f"{args.tag_rate:.0%} of the training images of class {c} ({FASHION_MNIST_CLASSES[c]}). "
             f"Training: {args.train} training images (the same seeded subset for every model), {args.epochs} "
             "epochs, the paper's recipe (AdamW 1e-3, weight decay 0.01, batch 128), one CPU thread. "
             "Architectures: `cnn` = the paper's CNN at half width (16, 32, 64); `lenet` = two 5x5 "
             "convolutions with max pooling and two linear layers.", "",
             f"Audit data: {args.per_class} held-out test images per class ({10 * args.per_class} images), "
             f"in two versions: **tagged** (the tag on {args.tag_rate:.0%} of class {c}'s test images, as in "
             "a real shortcut case) and **clean**. Maps: onnxsal's `vanilla` (|gradient|) and "
             "`gradient_x_input` maps of each image's true class. Finder: `find_shortcuts(engine.logits, "
             f"images, labels, maps, num_classes=10, seed=0, pairs={args.pairs})`, the other options at "
             "their defaults (paste margin 0.4, lift 3, largest box 25% of the image; docs/shortcuts.md).", "",
             "## Models", "", "| model | clean test accuracy (torch) | ONNX size |", "|---|---|---|"]
    for m in models:
        lines.append(f"| {m['name']} | {m['torch_clean_test_accuracy']:.3f} | {m['onnx_bytes'] / 1e3:.0f} KB |")
    lines += ["", f"## The class {c} finding in every run", "",
              f"Accuracy is on the audit images; `class {c} acc` is the share of class {c}'s audit images "
              "predicted as class "
              f"{c}. paste / control: the share of other classes' images turned into class {c} by pasting the "
              f"box / a random box of the same size from class {c} images; blank / control: the share of class "
              f"{c}'s images that leave the class when the box / a random box is filled with the image mean.", "",
              f"| model | data | method | accuracy | class {c} acc | box | IoU with tag | consistency | lift | paste | "
              "control | blank | control | suspected | all flagged classes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["tag_class_finding"]
        lines.append(f"| {r['model']} | {r['data']} | {r['method']} | {r['accuracy']:.3f} | "
                     f"{r['tagged_class_accuracy']:.3f} | `{f['box']}` | {f['iou_with_tag']:.2f} | "
                     f"{f['consistency']:.2f} | {f['lift']:.1f} | {_pct(f['paste_flip_rate'])} | "
                     f"{_pct(f['control_flip_rate'])} | "
                     f"{_pct(f['blank_flip_rate'])} | {_pct(f['control_blank_flip_rate'])} | "
                     f"{'yes' if f['suspected'] else 'no'} | {r['flagged'] or 'none'} |")
    lines += ["", "## Flag rates", "",
              "A class is *flagged* when the finder marks it suspected. On the clean models every flag is a "
              "false positive.", "",
              "| models | audit data (maps) | runs | classes tested | classes flagged | rate | runs naming exactly "
              f"class {c} with IoU > 0.3 |", "|---|---|---|---|---|---|---|"]
    for key, v in summary.items():
        if isinstance(v, dict):
            kind, data = key.split("_models_on_")
            data = data.replace("_data", "").replace("_", " ", 1)
            lines.append(f"| {kind} | {data} | {v['runs']} | {v['classes_tested']} | "
                         f"{v['classes_flagged']} | {_pct(v['flag_rate'])} | "
                         f"{v['runs_naming_exactly_the_tag_class_on_the_tag']} |")
    fp = [v for k, v in summary.items() if k in ("clean_models_on_tagged_data", "clean_models_on_clean_data")]
    lines += ["", f"**False-positive rate on the clean models: {sum(v['classes_flagged'] for v in fp)} of "
              f"{sum(v['classes_tested'] for v in fp)} class tests** (every clean model, class, audit set and "
              "method)."]
    lines += ["", f"Largest paste excess (paste - control) of any class on any clean model: "
              f"{_pct(summary['clean_models_max_paste_excess'])}; smallest of class {c} on the tagged models "
              f"with tagged data: {_pct(summary['tagged_models_min_paste_excess_tag_class'])}.", "",
              "## Other classes: every finding's paste excess", "",
              "| model | data | method | paste excess per class 0..9 (box area share) |", "|---|---|---|---|"]
    for r in rows:
        cells = ", ".join(f"{f['class']}: {_pct(f['paste_excess'])} ({f['area_fraction']:.2f})"
                          for f in r["result"]["findings"])
        lines.append(f"| {r['model']} | {r['data']} | {r['method']} | {cells} |")
    lines += ["", "## Figures", ""]
    for name in figs:
        lines.append(f"![{name}]({name})")
        lines.append("")
    lines += ["* `contrast_maps.png`: the class-contrast map `D_c` of the tagged class (its mean normalised "
              "|gradient| minus the other classes'), red where the class's saliency is higher; the green box is "
              "the finder's box, the dashed one the planted tag.",
              "* `paste_examples.png`: flipped pastes of the tagged model on the tagged data: the source image "
              "of the class, the target before and after the box is pasted, with the model's prediction.", "",
              f"Total run time: {seconds:.0f} s (training included). Every number is in `shortcut_demo.json`."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def bundle(models: list[dict], sets: dict, args, log) -> None:
    import shutil

    data = ROOT / "tests" / "data"
    for m in (models[0], next(m for m in models if m["kind"] == "clean")):
        dst = data / f"fmnist_{m['kind']}_cnn.onnx"
        shutil.copyfile(m["path"], dst)
        log(f"bundled {dst} ({dst.stat().st_size / 1e3:.0f} KB)")
    x, y = sets["tagged"]
    rng = np.random.default_rng(2)
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:args.bundle_per_class] for c in range(10)])
    xc = sets["clean"][0]
    np.savez_compressed(data / "fmnist_tag_sample.npz", x=np.round(x[keep] * 255).astype(np.uint8),
                        x_clean=np.round(xc[keep] * 255).astype(np.uint8), y=y[keep],
                        tag_box=np.array(TAG_BOX), tag_class=np.array(args.tag_class))
    log(f"bundled {data / 'fmnist_tag_sample.npz'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audit"))
    ap.add_argument("--tag-class", type=int, default=2)
    ap.add_argument("--tag-rate", type=float, default=0.9)
    ap.add_argument("--train", type=int, default=30000, help="training images (a seeded subset)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=200, help="audit images per class")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--tagged", nargs="+", default=["cnn:0", "cnn:1", "lenet:0"])
    ap.add_argument("--clean", nargs="+", default=["cnn:0", "cnn:1", "cnn:2", "lenet:0", "lenet:1"])
    ap.add_argument("--retrain", action="store_true", help="train even when the ONNX file exists")
    ap.add_argument("--bundle", action="store_true", help="copy a tagged and a clean model to tests/data")
    ap.add_argument("--bundle-per-class", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from benchmarks.models.training import load_fashion_mnist_nchw

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    xtr, ytr, xte, yte = load_fashion_mnist_nchw()
    rng = np.random.default_rng(0)
    sub = rng.permutation(len(xtr))[:args.train]
    xtr, ytr = xtr[sub], ytr[sub]
    models = train_models(args, xtr, ytr, xte, yte, out, log)
    idx = audit_sample(xte, yte, args.per_class, np.random.default_rng(3))
    xa, ya = xte[idx], yte[idx]
    sets = {"tagged": (stamp(xa, tag_mask(ya, args.tag_class, args.tag_rate, np.random.default_rng(4))), ya),
            "clean": (xa, ya)}
    rows = []
    for m in models:
        rows += run_finder(m, sets, args, log)
    figs = figures(rows, sets, models, args, out)
    summary = summarise(rows, models, args)
    seconds = time.perf_counter() - t0
    result = {"tag_box": TAG_BOX, "tag_class": args.tag_class, "tag_rate": args.tag_rate,
              "settings": vars(args), "models": models, "summary": summary, "runs": rows,
              "seconds": round(seconds, 1)}
    if args.bundle:
        bundle(models, sets, args, log)
    for m in result["models"]:
        m["path"] = os.path.relpath(m["path"], ROOT)
    (out / "shortcut_demo.json").write_text(json.dumps(result, indent=1) + "\n")
    write_readme(out, rows, models, summary, figs, args, seconds)
    log(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
