"""Robustness and randomisation metrics (docs/metrics.md#robustness, #randomisation) of a few
saliency methods on the bundled digits CNN (tests/data/digits_cnn.onnx, 20x20 digits), one
thread, with the seconds each metric took:

    OMP_NUM_THREADS=1 python benchmarks/robustness_digits.py --images 32 \
        --out benchmarks/results/robustness_digits.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxsal import methods  # noqa: E402
from onnxsal.engine import Engine  # noqa: E402
from onnxsal.metrics import base as metrics  # noqa: E402
from onnxsal.metrics.randomisation_mprt import model_explainer  # noqa: E402

METHODS = ["vanilla", "guided_backprop", "gradient_x_input", "smoothgrad"]
METRICS = ["max-sensitivity", "avg-sensitivity", "local-lipschitz", "transform-stability",
           "smooth-mprt", "efficient-mprt"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--samples", type=int, default=None,
                    help="noise draws of the sensitivity/Lipschitz metrics (default: theirs, 200)")
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    a = ap.parse_args()
    path = ROOT / "tests" / "data" / "digits_cnn.onnx"
    model = onnx.load(str(path))
    engine = Engine(model, threads=1, use_disk_cache=False)
    with np.load(ROOT / "tests" / "data" / "digits_sample.npz", allow_pickle=False) as z:
        x = z["x"][:a.images].astype(np.float32) / 255
    t = engine.logits(x).argmax(1)
    rows, secs, excluded = {}, {}, ""
    for name in METHODS:
        opts = {"seed": 0} if name == "smoothgrad" else {}
        maps = methods.compute(engine, x, [name], targets=t, **opts)[name].maps

        def explain(images, targets, name=name, opts=opts):
            return methods.compute(engine, images, [name], targets=targets, **opts)[name].maps

        options = {"explain_class": explain, "model": model,
                   "explain_model": model_explainer(name, threads=1, use_disk_cache=False),
                   "sensitivity_samples": a.samples, "lipschitz_samples": a.samples}
        rows[name] = {}
        for metric in METRICS:
            m = metrics.get(metric).from_options(options)
            t0 = time.perf_counter()
            res = m(engine.logits, x, maps)
            secs[(name, metric)] = time.perf_counter() - t0
            rows[name][metric] = res["value"]
            extra = ""
            if metric == "transform-stability":
                extra = f" (excluded {res['excluded']} of {res['images'] * res['transforms']})"
                excluded = (f"transform-stability: {res['excluded']} of {res['images'] * res['transforms']} "
                            "transformed images changed the predicted class and were excluded.")
            print(f"{name:<18}{metric:<22}{res['value']:8.3f}  {secs[(name, metric)]:6.1f} s{extra}",
                  flush=True)
    head = "| method | " + " | ".join(f"{m} ({metrics.get(m).direction})" for m in METRICS) + " |"
    lines = [f"# Robustness and randomisation metrics, digits CNN, {a.images} images", "",
             "`" + " ".join(["OMP_NUM_THREADS=1 python benchmarks/robustness_digits.py"] + sys.argv[1:]) + "`",
             "", head, "| :--- |" + " ---: |" * len(METRICS)]
    for name in METHODS:
        lines.append(f"| {name} | " + " | ".join(f"{rows[name][m]:.3f}" for m in METRICS) + " |")
    lines += ["", excluded]
    lines += ["", "Seconds per metric (one thread):", "", head, "| :--- |" + " ---: |" * len(METRICS)]
    for name in METHODS:
        lines.append(f"| {name} | " + " | ".join(f"{secs[(name, m)]:.1f}" for m in METRICS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
