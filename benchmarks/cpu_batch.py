"""Per-image cost of ``Engine.logits`` and ``Engine.gradient`` (vanilla) against the batch size
on the CPU provider: does a large batch cost more per image than small ones?

For each model and thread count, every round runs each batch size once (the sizes interleaved,
in a shuffled order per round, so that the machine's load drifts over all of them alike); the
table gives the median over the rounds of the wall-clock and the process CPU seconds per image.
The batch is forced (the engine's own batch-size choice is bypassed), so one call is one run;
a call is repeated until 50 ms have passed (small models).

    OMP_NUM_THREADS=1 python benchmarks/cpu_batch.py                       # every model, 1 and 2 threads
    OMP_NUM_THREADS=1 python benchmarks/cpu_batch.py --models digits-cnn --threads 1 --rounds 3

ResNet-18 (torchvision, random weights) is exported to benchmarks/models/resnet18.onnx on first
use; EfficientNet-Lite0 must be exported first (benchmarks/models/efficientnet_lite0.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "efficientnet-lite0": "benchmarks/models/efficientnet_lite0.onnx",
    "resnet18": "benchmarks/models/resnet18.onnx",
    "fashion-cnn": "benchmarks/paper/models/fashion_cnn.onnx",
    "digits-cnn": "tests/data/digits_cnn.onnx",
}
SIZES = [1, 2, 4, 8, 16, 32, 64]


def export_resnet18(path: Path) -> None:
    import onnx
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(path), opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    m = onnx.load(str(path))
    m.ir_version = min(m.ir_version, 10)
    onnx.save(m, str(path))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _timed(fn, min_seconds: float = 0.05):
    """(wall, CPU) seconds per call of ``fn``, repeated until ``min_seconds`` of wall clock
    have passed (small models: one call is too short to time)."""
    w, c, n = time.perf_counter(), time.process_time(), 0
    while True:
        fn()
        n += 1
        if time.perf_counter() - w >= min_seconds:
            return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def measure(name: str, threads: int, rounds: int, sizes: list[int], seed: int = 0) -> dict:
    from onnxsal.engine import Engine

    path = ROOT / MODELS[name]
    if name == "resnet18" and not path.is_file():
        export_resnet18(path)
    if not path.is_file():
        raise SystemExit(f"{name}: {MODELS[name]} is missing (see the module docstring)")
    eng = Engine(path, device="cpu", threads=threads, use_disk_cache=False)
    rng = np.random.default_rng(seed)
    x = rng.random((max(sizes),) + eng.input_shape, dtype=np.float32)
    info = {"model": MODELS[name], "threads": threads, "input": list(eng.input_shape),
            "activation_bytes_per_image": int(eng._bytes_per_image),
            "largest_tensor_bytes": int(eng._largest_tensor),
            "gradient_run_bytes_per_image": int(eng._bytes_per_run_image(1)),
            "engine_batch_logits": int(eng.batch_size()), "engine_batch_gradient": int(eng.batch_size(1))}
    forced = {"b": 1}
    eng.batch_size = lambda seeds=0: forced["b"]  # one run per call, whatever the engine would pick

    def run(kind: str, b: int):
        forced["b"] = b
        if kind == "logits":
            return _timed(lambda: eng.logits(x[:b], batch_size=b))
        return _timed(lambda: eng.gradient(x[:b], targets=0))

    for kind in ("logits", "gradient"):  # warm-up: sessions, the gradient graph, arenas
        for b in sizes:
            run(kind, b)
    times = {k: {b: [] for b in sizes} for k in ("logits", "gradient")}
    for r in range(rounds):
        order = list(rng.permutation(sizes))
        for kind in ("logits", "gradient"):
            for b in order:
                wall, cpu = run(kind, int(b))
                times[kind][int(b)].append((wall / b, cpu / b))
        print(f"{name} threads={threads} round {r + 1}/{rounds} load={os.getloadavg()[0]:.1f}", flush=True)
    info["per_image"] = {k: {str(b): {"wall_ms": 1e3 * float(np.median([t[0] for t in v])),
                                      "cpu_ms": 1e3 * float(np.median([t[1] for t in v])),
                                      "wall_ms_all": [round(1e3 * t[0], 2) for t in v],
                                      "cpu_ms_all": [round(1e3 * t[1], 2) for t in v]}
                             for b, v in d.items()} for k, d in times.items()}
    return info


def write_md(doc: dict, path: Path) -> None:
    res = doc["results"]
    sizes = doc["sizes"]
    lines = ["# CPU: per-image cost against the batch size", "",
             "Made by `benchmarks/cpu_batch.py` (forced batch, one run per call; sizes interleaved in a shuffled "
             f"order per round; {doc['rounds']} rounds; medians):", "", "```", doc["command"], "```", "",
             f"Machine: {doc['machine']}; {doc['versions']}. Load average during the run: "
             f"{doc['load_before']:.1f} before, {doc['load_after']:.1f} after (2 cores shared with other jobs: "
             "wall-clock is under contention, CPU ms is the process's CPU time per image).", "",
             "Activation bytes per image (the engine's estimate, `onnxsal.runtime.activation_bytes`), and the "
             "batch the memory-budget rule picks (2 GiB):", "",
             "| model | input | forward activations / image | gradient run / image | engine batch (logits, gradient) |",
             "|---|---|---|---|---|"]
    seen = set()
    for r in res:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | "
                     f"{r['activation_bytes_per_image'] / 2**20:.2f} MiB | "
                     f"{r['gradient_run_bytes_per_image'] / 2**20:.2f} MiB | "
                     f"{r['engine_batch_logits']}, {r['engine_batch_gradient']} |")
    for kind in ("logits", "gradient"):
        lines += ["", f"## `Engine.{kind}`: wall ms per image (CPU ms per image)", "",
                  "| model | threads | " + " | ".join(f"batch {b}" for b in sizes) + " | batch 64 / batch 1 |",
                  "|---|---|" + "---|" * (len(sizes) + 1)]
        for r in res:
            p = r["per_image"][kind]
            cells = [f"{p[str(b)]['wall_ms']:.2f} ({p[str(b)]['cpu_ms']:.2f})" for b in sizes]
            ratio = p[str(sizes[-1])]["wall_ms"] / p[str(sizes[0])]["wall_ms"]
            lines.append(f"| {r['model']} | {r['threads']} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    if doc.get("reading"):
        lines += ["", doc["reading"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_batch.md"))
    ap.add_argument("--from-json", default=None, help="Only rewrite the table from a results .json.")
    ap.add_argument("--reading", default=None, help="A paragraph appended to the table (with --from-json).")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        if args.reading:  # kept in the .json, so that the table can be rewritten again
            doc["reading"] = args.reading
            Path(args.from_json).write_text(json.dumps(doc, indent=2) + "\n")
        write_md(doc, out)
        return
    import onnxruntime

    load_before = os.getloadavg()[0]
    results = [measure(m, t, args.rounds, args.sizes) for t in args.threads for m in args.models]
    command = "OMP_NUM_THREADS=1 python benchmarks/cpu_batch.py " + " ".join(argv if argv is not None
                                                                             else sys.argv[1:])
    doc = {"command": command.strip(), "rounds": args.rounds, "sizes": args.sizes,
           "machine": f"{platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores",
           "versions": f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
                       f"numpy {np.__version__}",
           "load_before": load_before, "load_after": os.getloadavg()[0], "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    write_md(doc, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
