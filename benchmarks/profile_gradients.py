"""Where the time of the all-class gradient graph goes: onnxruntime's session profiler on the
augmented model of one of benchmarks/gradients.py's models, summed per operator type and per
node, next to the forward's own profile (issue 7's "session profiling shows where time goes").

    python benchmarks/profile_gradients.py cnn
    python benchmarks/profile_gradients.py mobilenet_v3_small --batch 1 --seeds 20 --top 25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def profile(model_bytes: bytes, feeds: dict, threads: int, runs: int, workdir: Path, tag: str):
    """Per-node durations (µs, summed over `runs` runs after one warm-up) from ORT's profiler."""
    import onnxruntime as ort

    from onnxsal.onnx_util import cpu_session, quiet_options

    so = quiet_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / tag)
    sess = cpu_session(model_bytes, options=so)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list] = {}
    n_runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            n_runs += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        rec = per_node.setdefault(node, [op, 0.0, e.get("args", {}).get("output_type_shape")])
        rec[1] += e["dur"]
    scale = 1.0 / max(n_runs, 1)  # per run (the warm-up run is included in the profile)
    return {k: (op, dur * scale, shp) for k, (op, dur, shp) in per_node.items()}


def summarize(per_node: dict, top: int, title: str) -> float:
    by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for op, dur, _ in per_node.values():
        by_op[op][0] += dur
        by_op[op][1] += 1
    total = sum(v[0] for v in by_op.values())
    print(f"\n== {title}: {total / 1e3:.2f} ms of kernel time per run")
    for op, (dur, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {op:28s} {dur / 1e3:9.3f} ms  {100 * dur / total:5.1f}%  ({n} nodes)")
    print("  -- top nodes")
    for name, (op, dur, shp) in sorted(per_node.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {dur / 1e3:8.3f} ms  {op:18s} {name[:60]:60s} {json.dumps(shp)[:80] if shp else ''}")
    return total


def main() -> None:
    import onnx
    from gradients import MODELS, build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--batch", type=int, help="images (default: the benchmark's batch)")
    ap.add_argument("--seeds", type=int, help="seed rows K (default: all classes, at most 100)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: the engine's data-parallel runs use one each)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()

    import torch

    from converters.torch_export import export
    from onnxsal.autodiff import augment
    from onnxsal.model import find_logits
    from onnxsal.simplify import simplify

    kind, size, batch, n_logits, *_ = MODELS[a.model]
    batch = a.batch or batch
    k = a.seeds or min(n_logits, 100)
    torch.set_num_threads(a.threads)
    m = build(kind, n_logits)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(m, torch.from_numpy(x[:1]), tmp / "m.onnx", opset=17)
        base = onnx.load(str(tmp / "m.onnx"))
        model = augment(simplify(base), logits=find_logits(base).tensor)
        meta = {p.key: p.value for p in model.metadata_props}
        seeds = np.zeros((k, batch, n_logits), np.float32)
        seeds[np.arange(k), :, np.arange(k) % n_logits] = 1.0
        feeds = {meta["onnxsal.input"]: x, meta["onnxsal.seed"]: seeds}
        fwd = profile(base.SerializeToString(), feeds, a.threads, a.runs,
                      tmp, "fwd")
        bwd = profile(model.SerializeToString(), feeds, a.threads, a.runs, tmp, "aug")
    t_f = summarize(fwd, a.top, f"forward, batch {batch}")
    t_b = summarize(bwd, a.top, f"augmented, batch {batch}, K={k}")
    print(f"\naugmented / ((K+1) x forward) kernel time: {t_b / ((k + 1) * t_f):.2f}")
    print(f"command: python benchmarks/profile_gradients.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
