"""One anchor explanation on EfficientNet-Lite0 (the case ``anchor-efficientnet-lite0`` of
benchmarks/explainer_speed.py) with and without the engine's CPU batch cap, alternated over
rounds in one process: wall and CPU seconds, engine runs, and whether the explanations agree.

    OMP_NUM_THREADS=1 python benchmarks/cpu_batch_anchor.py --rounds 2

``cap 0`` is the memory-budget rule alone (the engine before the cap); ``default`` is
onnxsal.runtime.CPU_BATCH_BYTES.
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
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> None:
    from explainer_speed import CASES

    from onnxsal import methods, runtime
    from onnxsal.data import load_dataset
    from onnxsal.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    case = CASES["anchor-efficientnet-lite0"]
    caps = {"cap 0 (memory budget only)": 0, f"default ({runtime.CPU_BATCH_BYTES >> 20} MiB)": None}
    engines = {k: Engine(ROOT / case["model"], device="cpu", threads=args.threads, use_disk_cache=False,
                         cpu_batch_bytes=v) for k, v in caps.items()}
    first = next(iter(engines.values()))
    data = load_dataset(case["data"], shape=first.input_shape, limit=case["index"] + 1)
    x = data.images[case["index"]:case["index"] + 1].astype(np.float32)
    method = methods.get(case["method"])
    target = int(first.logits(x).argmax(1)[0])
    rows: dict[str, list] = {k: [] for k in engines}
    maps = {}
    for eng in engines.values():
        method(eng, x, targets=target, **{**case["options"], **case["warmup"]})
    for r in range(args.rounds):
        for k, eng in (list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]):
            w, c = time.perf_counter(), time.process_time()
            out = method(eng, x, targets=target, **case["options"])
            rows[k].append((time.perf_counter() - w, time.process_time() - c))
            maps[k] = (out.maps, json.dumps(out.info.get("anchors"), default=str))
            print(f"round {r + 1} {k}: batch {eng.batch_size()}, {rows[k][-1][0]:.1f} s wall, "
                  f"{rows[k][-1][1]:.1f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)
    ref = next(iter(maps.values()))
    same = all(np.array_equal(m[0], ref[0]) and m[1] == ref[1] for m in maps.values())
    print(f"same explanation (map and anchor) under every cap: {same}")
    for k, v in rows.items():
        print(f"{k}: median {np.median([t[0] for t in v]):.1f} s wall, {np.median([t[1] for t in v]):.1f} s CPU "
              f"over {len(v)} rounds")


if __name__ == "__main__":
    main()
