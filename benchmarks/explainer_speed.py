"""Speed of the model-agnostic explainers (issue 17): batched engine calls against a plain
per-sample loop, for each case of :data:`CASES`.

Each case explains one image twice with the same seed: once as onnxsal runs (every round of
perturbed images in one ``engine.logits`` call, split only by the memory bound), once through
an engine that runs the same images one call each (the way the reference implementations
call the model: one ``predict`` per perturbed sample or per individual). Both runs must give
the same explanation; the table gives the model evaluations, the engine calls and the
seconds of each, and the ratio.

    OMP_NUM_THREADS=1 python benchmarks/explainer_speed.py                 # every case
    OMP_NUM_THREADS=1 python benchmarks/explainer_speed.py --cases lore-fashion-cnn

A case is a dict entry: the model file, the data (a built-in name, folder or .npz), which
image, the method and its options (``prepare`` may add options that need a file, e.g. an
autoencoder folder). To add one (ABELE, say), add an entry.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES: dict[str, dict] = {
    # an anchor for a 224x224 ImageNet photo (scikit-image's astronaut) on EfficientNet-Lite0
    # (export: python benchmarks/models/efficientnet_lite0.py -o benchmarks/models/efficientnet_lite0.onnx)
    "anchor-efficientnet-lite0": {
        "model": "benchmarks/models/efficientnet_lite0.onnx", "data": "skimage-samples", "index": 0,
        "method": "anchor", "options": {"max_anchor_size": 3}},
    # LORE for a Fashion-MNIST test image on the paper's CNN (benchmarks/paper/models/)
    "lore-fashion-cnn": {
        "model": "benchmarks/paper/models/fashion_cnn.onnx", "data": "fashion-mnist", "index": 0,
        "method": "lore", "options": {"segmentation": "slic", "fill": 0.0}},
    # the same LORE explanation on EfficientNet-Lite0 would take ~3,000 evaluations of 70 ms
}


class Counting:
    """An engine that counts its ``logits`` calls and images; ``per_sample`` runs each image
    of a call as a call of its own."""

    def __init__(self, eng, per_sample: bool = False):
        self.eng, self.per_sample = eng, per_sample
        self.calls = self.images = 0

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def logits(self, x):
        self.images += len(x)
        if not self.per_sample:
            self.calls += 1
            return self.eng.logits(x)
        self.calls += len(x)
        return np.concatenate([self.eng.logits(x[j:j + 1]) for j in range(len(x))])


def _summary(method: str, maps) -> str:
    """What must agree between the two runs: the map and the rule."""
    return json.dumps({"map": np.round(maps.maps, 6).tolist(),
                       "rule": [maps.info.get("anchors"), [r["factual"] for r in maps.info.get("explanations", [])]]},
                      default=str)


def run_case(name: str, case: dict, threads: int) -> dict:
    from onnxsal import methods
    from onnxsal.data import load_dataset
    from onnxsal.engine import Engine

    model = ROOT / case["model"]
    if not model.is_file():
        raise SystemExit(f"{name}: {case['model']} is missing (see the comment at the case in CASES)")
    eng = Engine(model, device="cpu", threads=threads, use_disk_cache=False)
    data = load_dataset(case["data"], shape=eng.input_shape, limit=case["index"] + 1)
    x = data.images[case["index"]:case["index"] + 1].astype(np.float32)
    options = dict(case.get("options", {}))
    if case.get("prepare"):
        options.update(case["prepare"]())
    method = methods.get(case["method"])
    target = int(eng.logits(x).argmax(1)[0])
    eng.logits(np.repeat(x, 2, axis=0))  # warm up both batch shapes
    rows = {}
    for mode in ("batched", "per_sample"):
        counting = Counting(eng, per_sample=mode == "per_sample")
        t0 = time.perf_counter()
        maps = method(counting, x, targets=target, **options)
        rows[mode] = {"seconds": time.perf_counter() - t0, "evaluations": counting.images,
                      "engine_calls": counting.calls, "summary": _summary(case["method"], maps)}
        print(f"{name} {mode}: {rows[mode]['evaluations']} evaluations, {rows[mode]['engine_calls']} calls, "
              f"{rows[mode]['seconds']:.2f} s", flush=True)
    extra = method.explanation(maps, 0, eng.labels or data.class_names) if method.explains() else None
    same = rows["batched"]["summary"] == rows["per_sample"]["summary"]
    for r in rows.values():
        del r["summary"]
    return {"case": name, "model": case["model"], "image": data.names[case["index"]], "method": case["method"],
            "options": options, "input": list(eng.input_shape), "target": target, **rows, "same_result": same,
            "speedup": rows["per_sample"]["seconds"] / rows["batched"]["seconds"],
            "explanation": {k: extra[k] for k in ("rule", "precision", "coverage", "fidelity", "cv_fidelity",
                                                  "valid_counterfactuals") if extra and k in extra}}


def write_md(results: list[dict], command: str, path: Path) -> None:
    lines = ["# Explainer speed: batched engine calls against a per-sample loop", "",
             "Made by `benchmarks/explainer_speed.py` (one image per case, same seed in both runs; "
             "per-sample: one `engine.logits` call per perturbed image, as the reference implementations "
             "call the model):", "", "```", command, "```", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, onnxruntime CPU, "
             f"{results[0]['threads'] if results else 1} thread(s), shared with other jobs.", "",
             "| case | input | evaluations | batched calls | batched s | per-sample calls | per-sample s | "
             "speedup | same result |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, p = r["batched"], r["per_sample"]
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['input']))} | {b['evaluations']} | {b['engine_calls']} | "
                     f"{b['seconds']:.2f} | {p['engine_calls']} | {p['seconds']:.2f} | {r['speedup']:.1f}x | "
                     f"{'yes' if r['same_result'] else 'NO'} |")
    lines += ["", "Explanations:", ""]
    for r in results:
        lines.append(f"- {r['case']} ({r['image']}, class {r['target']}, options {r['options']}): "
                     + json.dumps(r["explanation"], default=str))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explainer_speed.md"))
    args = ap.parse_args(argv)
    results = []
    for name in args.cases:
        r = run_case(name, CASES[name], args.threads)
        r["threads"] = args.threads
        results.append(r)
    out = Path(args.out)
    command = "OMP_NUM_THREADS=1 python benchmarks/explainer_speed.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])
    write_md(results, command.strip(), out)
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "results": results}, indent=2,
                                                   default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
