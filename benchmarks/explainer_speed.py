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

#: mode: (one engine call per image?, options added to the case's)
MODES = {"batched": (False, {}), "per_sample": (True, {}),
         # LORE as the reference code runs it: every mated or mutated individual evaluated
         # (no memory of genomes seen), one model call each
         "reference_loop": (True, {"cache": False})}

CASES: dict[str, dict] = {
    # an anchor for a 224x224 ImageNet photo (scikit-image's astronaut) on EfficientNet-Lite0
    # (export: python benchmarks/models/efficientnet_lite0.py -o benchmarks/models/efficientnet_lite0.onnx)
    "anchor-efficientnet-lite0": {
        "model": "benchmarks/models/efficientnet_lite0.onnx", "data": "skimage-samples", "index": 0,
        "method": "anchor", "options": {"segmentation": "slic", "n_segments": 12, "max_anchor_size": 2},
        # ~70 ms per evaluation on one shared core: the per-sample loop is timed on 256 of the
        # explanation's own perturbed images and scaled to all of them (marked "estimated")
        "modes": ["batched", "per_sample_sampled"],
        "warmup": {"batch_size": 2, "coverage_samples": 10, "max_anchor_size": 1, "threshold": 0.01}},
    # LORE for a Fashion-MNIST test image on the paper's CNN (benchmarks/paper/models/)
    "lore-fashion-cnn": {
        "model": "benchmarks/paper/models/fashion_cnn.onnx", "data": "fashion-mnist", "index": 0,
        "method": "lore", "options": {"segmentation": "slic", "fill": 0.0},
        "modes": ["batched", "per_sample", "reference_loop"], "warmup": {"population": 4, "generations": 1}},
    # LORE on the bundled digits CNN (tests/data), a small model: call overhead dominates
    "lore-digits-cnn": {
        "model": "tests/data/digits_cnn.onnx", "data": "tests/data/digits_sample.npz", "index": 0,
        "method": "lore", "options": {"segmentation": "slic", "fill": 0.0},
        "modes": ["batched", "per_sample", "reference_loop"], "warmup": {"population": 4, "generations": 1}},
}


class Counting:
    """An engine that counts its ``logits`` calls and images; ``per_sample`` runs each image
    of a call as a call of its own."""

    def __init__(self, eng, per_sample: bool = False, record: int = 0):
        self.eng, self.per_sample, self.record = eng, per_sample, record
        self.calls = self.images = 0
        self.recorded: list = []

    def __getattr__(self, name):
        return getattr(self.eng, name)

    def logits(self, x):
        if sum(map(len, self.recorded)) < self.record:
            self.recorded.append(np.array(x[:self.record - sum(map(len, self.recorded))]))
        self.images += len(x)
        if not self.per_sample:
            self.calls += 1
            return self.eng.logits(x)
        self.calls += len(x)
        return np.concatenate([self.eng.logits(x[j:j + 1]) for j in range(len(x))])


SAMPLED = 256


def _sampled_per_sample(eng, images: np.ndarray, batched: dict) -> dict:
    """The per-sample loop's time estimated from ``images`` (the first perturbed images of the
    batched run): batched seconds + evaluations x (one-call-per-image seconds - batched
    seconds) per image, both timed on these images."""
    t0 = time.perf_counter()
    eng.logits(images)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(len(images)):
        eng.logits(images[j:j + 1])
    t_single = time.perf_counter() - t0
    n = batched["evaluations"]
    extra = n * (t_single - t_batch) / len(images)
    print(f"  {len(images)} of its images: {t_batch:.2f} s in batches, {t_single:.2f} s one call each", flush=True)
    return {"seconds": batched["seconds"] + extra, "evaluations": n, "engine_calls": n, "estimated": True,
            "timed_images": len(images), "timed_batched_s": t_batch, "timed_single_s": t_single}


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
    method(eng, x, targets=target, **{**options, **case.get("warmup", {})})  # imports, sessions, JIT
    rows, first, recorded = {}, None, None
    for mode in case.get("modes", ["batched", "per_sample"]):
        if mode == "per_sample_sampled":
            rows[mode] = _sampled_per_sample(eng, recorded, rows["batched"])
            continue
        per_sample, extra_opts = MODES[mode]
        counting = Counting(eng, per_sample=per_sample, record=SAMPLED if mode == "batched" else 0)
        t0 = time.perf_counter()
        maps = method(counting, x, targets=target, **options, **extra_opts)
        rows[mode] = {"seconds": time.perf_counter() - t0, "evaluations": counting.images,
                      "engine_calls": counting.calls, "summary": _summary(case["method"], maps)}
        first = first or maps
        recorded = np.concatenate(counting.recorded) if counting.recorded else None
        print(f"{name} {mode}: {rows[mode]['evaluations']} evaluations, {rows[mode]['engine_calls']} calls, "
              f"{rows[mode]['seconds']:.2f} s", flush=True)
    extra = method.explanation(first, 0, eng.labels or data.class_names) if method.explains() else None
    runs = {r["summary"] for r in rows.values() if "summary" in r}
    same = len(runs) == 1 if sum("summary" in r for r in rows.values()) > 1 else None  # None: one run only
    for r in rows.values():
        r.pop("summary", None)
    base = rows["batched"]["seconds"]
    return {"case": name, "model": case["model"], "image": data.names[case["index"]], "method": case["method"],
            "options": options, "input": list(eng.input_shape), "target": target, "modes": rows, "same_result": same,
            "speedup": {m: r["seconds"] / base for m, r in rows.items() if m != "batched"},
            "explanation": {k: extra[k] for k in ("rule", "precision", "coverage", "met_threshold", "fidelity",
                                                  "cv_fidelity", "valid_counterfactuals") if extra and k in extra}}


def write_md(results: list[dict], command: str, path: Path) -> None:
    lines = ["# Explainer speed: batched engine calls against a per-sample loop", "",
             "Made by `benchmarks/explainer_speed.py` (one image per case, same seed in both runs; "
             "per-sample: one `engine.logits` call per perturbed image, as the reference implementations "
             "call the model):", "", "```", command, "```", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, onnxruntime CPU, "
             f"{results[0]['threads'] if results else 1} thread(s), shared with other jobs (load ~10 on 2 cores "
             "during the committed run: seconds are wall clock under contention).", "",
             "| case | input | mode | evaluations | engine calls | seconds | slower than batched | same result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for mode, m in r["modes"].items():
            ratio = "" if mode == "batched" else f"{r['speedup'][mode]:.1f}x"
            same = {True: "yes", False: "NO", None: "n/a (one run)"}[r["same_result"]]
            if m.get("estimated"):
                mode, same = f"{mode} (estimated: {m['timed_images']} of its images timed)", "n/a"
            lines.append(f"| {r['case']} | {'x'.join(map(str, r['input']))} | {mode} | {m['evaluations']} | "
                         f"{m['engine_calls']} | {m['seconds']:.2f} | {ratio} | {same} |")
    lines += ["", "Reading: the per-sample loop runs exactly the images of the batched run, one `engine.logits` "
              "call each, so its ratio is what batching alone buys; `reference_loop` (LORE) also evaluates every "
              "mated or mutated individual again, as the reference code does (`cache=False`: same neighbourhood, "
              "same rules). Batching removes per-call overhead (onnxruntime's run, onnxsal's input checks), not "
              "arithmetic: on one CPU thread a small model gains a little and a large one (EfficientNet-Lite0, "
              "tens of ms per image) nothing, since its batched run costs as much per image as single runs. The "
              "goal of >= 10x from batching is not reached on this machine; the reference LORE code also predicts "
              "the explained record again inside every fitness evaluation (two calls per individual), which this "
              "table does not count.", "", "Explanations:", ""]
    for r in results:
        lines.append(f"- {r['case']} ({r['image']}, class {r['target']}, options {r['options']}): "
                     + json.dumps(r["explanation"], default=str))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explainer_speed.md"))
    ap.add_argument("--from-json", default=None, help="Only rewrite the table from a results .json.")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        write_md(doc["results"], doc["command"], Path(args.out))
        return
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
