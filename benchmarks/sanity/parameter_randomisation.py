"""Cascading model-parameter randomisation (Adebayo et al. 2018; docs/definitions.md#sanity-checks) on the
project's models, with results under benchmarks/results/sanity/<name>/ and a summary table
beside the paper's findings in benchmarks/results/sanity/README.md.

    # the paper CNN trained on Fashion-MNIST (benchmarks/paper/train_fashion.py)
    python benchmarks/sanity/parameter_randomisation.py fashion_cnn \
        benchmarks/paper/models/fashion_cnn.onnx --data fashion-mnist --limit 32
    # EfficientNet-Lite0 (export: python benchmarks/models/efficientnet_lite0.py -o out/effnet.onnx)
    python benchmarks/sanity/parameter_randomisation.py efficientnet_lite0 out/effnet.onnx \
        --data skimage-samples --limit 6 --max-steps 10
    python benchmarks/sanity/parameter_randomisation.py --summary   # README.md only

This is ``onnxsal sanity`` with method options (SmoothGrad and integrated gradients with
fewer samples/steps, to fit a 2-core CPU) and the summary writer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "sanity"

METHODS = ["vanilla", "original", "gradient_x_input", "integrated_gradients", "smoothgrad",
           "guided_backprop", "gradcam"]
OPTIONS = {"smoothgrad": {"samples": 16}, "integrated_gradients": {"steps": 16}}

# Adebayo et al. (2018), cascading randomisation of Inception v3 (ImageNet) and the data
# randomisation test (MNIST / Fashion-MNIST): what they report for each method
PAPER = {
    "vanilla": "changes (passes)",
    "original": "- (abs gradient: the paper's 'Gradient' map)",
    "gradient_x_input": "stays similar (input structure dominates)",
    "integrated_gradients": "stays similar (input structure dominates)",
    "smoothgrad": "changes (passes)",
    "guided_backprop": "barely changes (fails)",
    "gradcam": "changes (passes)",
}


def run(name: str, model: str, data: str, limit: int, max_steps: int | None, threads: int,
        methods: list[str]) -> None:
    from onnxsal.sanity_run import run_sanity

    t0 = time.perf_counter()
    rep = run_sanity(model, data, methods, RESULTS / name, mode="cascading", seed=0,
                     device="cpu", threads=threads, limit=limit, max_steps=max_steps,
                     method_options={k: v for k, v in OPTIONS.items() if k in methods},
                     progress=lambda s: print(s, flush=True))
    extra = {"seconds": round(time.perf_counter() - t0, 1), "command": " ".join(["python"] + sys.argv)}
    (RESULTS / name / "run.json").write_text(json.dumps(extra, indent=2) + "\n")
    for m, v in rep["verdicts"].items():
        print(f"{m:<24}{'pass' if v['passes'] else 'FAIL':<6}{v['reason']}")
    for m, v in rep["step_verdicts"].items():
        print(f"{m:<24}{'pass' if v['passes'] else 'FAIL':<6}top layer: {v['reason']}")


def summary() -> str:
    from onnxsal.report import atomic_write_text, markdown_table

    runs = {}
    for p in sorted(RESULTS.glob("*/sanity.json")):
        runs[p.parent.name] = json.loads(p.read_text())
    methods = []
    for r in runs.values():
        methods += [m for m in r["methods"] if m not in methods]
    headers = ["method"] + [f"{n} ({len(r['layers'])} layers, {r['images']} images)" for n, r in runs.items()] \
        + ["Adebayo et al."]
    rows = []
    for m in methods:
        row = [m]
        for r in runs.values():
            v = r["verdicts"].get(m)
            cell = "-" if v is None else \
                f"{'pass' if v['passes'] else '**fail**'} ({v['final']:.2f})" if v["final"] is not None else "n/a"
            sv = (r.get("step_verdicts") or {}).get(m)
            if sv is not None and sv["passes"] is not None:
                drop = sv["steps"][0]["drop"]
                cell += f"; top layer: {'pass' if sv['passes'] else '**fail**'} (drop {drop:.3f})"
            row.append(cell)
        row.append(PAPER.get(m, "-"))
        rows.append(row)
    step_rule = next((r["step_rule"] for r in runs.values() if r.get("step_rule")), None)
    lines = ["# Sanity checks: model-parameter randomisation\n",
             "Cascading randomisation from the logits down (onnxsal.metrics.sanity); cell = verdict "
             "(mean Spearman rank correlation of the absolute maps with the trained model's maps "
             "once every layer is randomised). Rule: "
             + (next(iter(runs.values()))["rule"] if runs else "") + ".\n",
             (f"Top-layer verdict (runs made with it): {step_rule}; the cell gives the drop of the "
              "mean similarity when the top layer alone is randomised.\n" if step_rule else ""),
             markdown_table(headers, rows, "l" * len(headers)),
             "\nPer-model details (per step, per metric, mean and std over images; figures): "
             + ", ".join(f"[{n}]({n}/sanity.md)" for n in runs) + ".\n"]
    lines.append(
        "Notes. SmoothGrad and integrated gradients run with 16 samples/steps here (2-core CPU); "
        "SmoothGrad's step-0 self-similarity (re-run with seed + 1) is then low, and the rule "
        "fails a method whose drop is not clearly larger than its own noise. The guided rule set "
        "treats ReLU6 (Clip with lower bound 0, EfficientNet-Lite0's activation) as a ReLU. The "
        "single end-point rule cannot see guided backprop's failure mode (it ignores the upper "
        "layers and changes only once the lowest ones go); the top-layer verdict does, and the "
        "per-step curves show it. A method "
        "whose maps are constant (Grad-CAM on a 1x1 layer) scores 1 by convention (both maps "
        "normalise to zeros).\n")
    dr = RESULTS / "data_randomisation" / "data_randomisation.md"
    if dr.is_file():
        lines.append("Data randomisation test: [data_randomisation](data_randomisation/data_randomisation.md).\n")
    reading = RESULTS / "reading.md"  # hand-written reading of the results, kept on re-runs
    if reading.is_file():
        lines.append(reading.read_text())
    text = "\n".join(lines)
    atomic_write_text(RESULTS / "README.md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("model", nargs="?")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--summary", action="store_true", help="only rewrite README.md")
    a = ap.parse_args()
    if not a.summary:
        if not (a.name and a.model):
            ap.error("give NAME MODEL, or --summary")
        run(a.name, a.model, a.data, a.limit, a.max_steps, a.threads, a.methods.split(","))
    print(summary())


if __name__ == "__main__":
    main()
