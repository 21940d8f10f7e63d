"""Where a metric's time goes: the model session against onnxsal's own Python.

On the set-up of benchmarks/evaluation_speed.py (the paper's Fashion-MNIST CNN, its first N
test images, onnxsal's vanilla maps, T threads), per metric: the time of ``Metric.evaluate``,
of ``Engine.logits`` on the very batch the metric sends to the model, and of a bare
onnxruntime session (same graph, same threads) on that batch in the engine's chunks; the rest
of ``evaluate`` is onnxsal's Python (variants, subsets, scores). Best of ``--repeat`` runs.

    OMP_NUM_THREADS=1 python benchmarks/metric_profile.py --n 256 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = {"region-perturbation-morf": {"patch": 1, "steps": 16},
           "faithfulness-correlation": {"subset": 0.1, "runs": 100}}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)

    import onnxruntime as ort

    from benchmarks.evaluation_speed import load_model
    from onnxsal import methods
    from onnxsal.data import load_dataset
    from onnxsal.metrics import base

    _, _, engine = load_model(a.threads)
    x = load_dataset("fashion-mnist", shape=(1, 28, 28), limit=a.n).images.astype(np.float32)
    y = engine.logits(x).argmax(1)
    maps = np.asarray(methods.compute(engine, x, ["vanilla"], targets=y)["vanilla"].maps, np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bare = ort.InferenceSession(engine.model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    inp, out, bs = engine.input_name, engine.logits_spec.tensor, engine.batch_size()
    for name, kw in METRICS.items():
        m = base.get(name)(**kw)
        sent: list[np.ndarray] = []

        def record(batch, sent=sent):
            sent.append(batch)
            return engine.logits(batch)

        m.evaluate(record, x, maps)
        t_eval = best(lambda m=m: m.evaluate(engine.logits, x, maps), a.repeat)
        t_logits = sum(best(lambda b=b: engine.logits(b), a.repeat) for b in sent)
        t_bare = sum(best(lambda b=b: [bare.run([out], {inp: np.ascontiguousarray(b[i:i + bs])})
                                       for i in range(0, len(b), bs)], a.repeat) for b in sent)
        print(f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())}): evaluate "
              f"{t_eval * 1e3:.0f} ms; {sum(len(b) for b in sent)} model inputs in "
              f"{len(sent)} call(s); Engine.logits {t_logits * 1e3:.0f} ms; bare onnxruntime "
              f"session {t_bare * 1e3:.0f} ms (chunks of {bs}); onnxsal's Python outside "
              f"Engine.logits {(t_eval - t_logits) * 1e3:.0f} ms "
              f"({100 * (t_eval - t_logits) / t_eval:.0f}%)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
