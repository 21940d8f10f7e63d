"""ABELE's speed and quality (onnxsal/methods/abele.py, docs/abele.md).

``digits``: ABELE on held-out images of the bundled digits model (tests/data/digits_cnn.onnx)
with the bundled autoencoder (tests/data/aae_digits): per image the neighbourhood, the tree's
fidelity, the exemplars and counter-exemplars found and how many really keep / change the
model's label (re-checked here with a session of the model file), model evaluations, engine
calls and seconds.

``fashion``: one ABELE explanation of Fashion-MNIST test images with the paper's CNN
(benchmarks/paper/models/fashion_cnn.onnx) and the bundled Fashion-MNIST autoencoder, batched
as onnxsal runs it (one engine call per generation or round) against a plain per-sample loop
(one engine call per decoded image), and against a loop that also runs the autoencoder's
networks one code at a time (the way ABELE's reference code calls decoder and black box
inside its genetic fitness and its rejection loops); all give the same explanation (checked).

    python benchmarks/abele_speed.py digits --limit 20
    python benchmarks/abele_speed.py fashion --limit 3
Both use one onnxruntime thread. Results: benchmarks/results/abele_speed.md.
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
os.environ.setdefault("OMP_NUM_THREADS", "1")

from onnxsal import methods  # noqa: E402
from onnxsal.autoencoder import Autoencoder, load_autoencoder  # noqa: E402
from onnxsal.engine import Engine  # noqa: E402
from onnxsal.onnx_util import cpu_session  # noqa: E402


class PerSample:
    """The engine, but every forward pass is a loop of one-image calls."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def logits(self, x, batch_size=None):
        return np.concatenate([self._engine.logits(x[i:i + 1]) for i in range(len(x))])


class PerSampleAE(Autoencoder):
    """The autoencoder, but every encoder, decoder and discriminator run takes one row."""

    def _run(self, role, x, batch=1):
        return super()._run(role, x, batch=1)


def _check(model_path, e, ex, cex):
    sess = cpu_session(str(model_path), 1)
    name = sess.get_inputs()[0].name

    def lab(a):
        return sess.run(None, {name: a})[0].argmax(1) if len(a) else np.zeros(0, int)

    return int((lab(ex) == e["target"]).sum()), int((lab(cex) != e["target"]).sum())


def digits(limit: int) -> dict:
    model, aae = ROOT / "tests/data/digits_cnn.onnx", ROOT / "tests/data/aae_digits"
    eng = Engine(model, device="cpu", threads=1)
    ae = load_autoencoder(aae)
    s = np.load(ROOT / "tests/data/digits_sample.npz", allow_pickle=False)
    idx = np.linspace(0, len(s["x"]) - 1, limit).astype(int)
    x = s["x"][idx].astype(np.float32) / 255
    rows = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        m = methods.get("abele")(eng, x[i:i + 1], autoencoder=ae)
        dt = time.perf_counter() - t0
        e = m.info["explanations"][0]
        ex, cex = m.info["exemplars"][0], m.info["counter_exemplars"][0]
        keep, change = _check(model, e, ex, cex)
        rows.append({"image": int(idx[i]), "label": int(s["y"][idx[i]]), "target": e["target"],
                     "recon_label_kept": e["reconstruction"]["model_label"] == e["target"],
                     "fidelity": e["fidelity"], "neighbourhood": e["neighbourhood"]["size"],
                     "same": e["neighbourhood"]["same_label"], "rule_conditions": len(e["rule"]["premises"]),
                     "counterfactuals": len(e["counterfactuals"]),
                     "counterfactuals_valid": sum(c["changes_prediction"] for c in e["counterfactuals"]),
                     "min_delta": min((len(c["delta"]) for c in e["counterfactuals"]), default=None),
                     "exemplars": len(ex), "exemplars_keep": keep, "exemplar_hit_rate": e["exemplars"]["hit_rate"],
                     "counter_exemplars": len(cex), "counter_exemplars_change": change,
                     "counter_hit_rate": e["counter_exemplars"]["hit_rate"],
                     "evaluations": e["evaluations"], "engine_calls": e["engine_calls"], "seconds": dt})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "autoencoder": ae.describe()}


def fashion(limit: int) -> dict:
    from onnxsal.data import fashion_mnist_arrays

    model = ROOT / "benchmarks/paper/models/fashion_cnn.onnx"
    aae = ROOT / "tests/data/aae_fashion"
    eng = Engine(model, device="cpu", threads=1)
    ae = load_autoencoder(aae)
    xr, yr, _ = fashion_mnist_arrays("test")
    x = (xr[:limit].astype(np.float32) / 255)[:, None]
    rows = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        a = methods.get("abele")(eng, x[i:i + 1], autoencoder=ae)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = methods.get("abele")(PerSample(eng), x[i:i + 1], autoencoder=ae)
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        one = PerSampleAE(ae.path, ae.latent, ae.input_shape, ae.record, ae._sessions)
        c = methods.get("abele")(PerSample(eng), x[i:i + 1], autoencoder=one)
        t_all = time.perf_counter() - t0
        ea, eb, ec = (m.info["explanations"][0] for m in (a, b, c))
        same = bool(np.array_equal(a.maps, b.maps) and np.array_equal(a.maps, c.maps)) \
            and ea["rule"] == eb["rule"] == ec["rule"]
        keep, change = _check(model, ea, a.info["exemplars"][0], a.info["counter_exemplars"][0])
        rows.append({"image": i, "label": int(yr[i]), "target": ea["target"], "fidelity": ea["fidelity"],
                     "exemplars": len(a.info["exemplars"][0]), "exemplars_keep": keep,
                     "counter_exemplars": len(a.info["counter_exemplars"][0]), "counter_exemplars_change": change,
                     "evaluations": ea["evaluations"], "engine_calls_batched": ea["engine_calls"],
                     "engine_calls_loop": ea["evaluations"], "seconds_batched": t_batched,
                     "seconds_loop": t_loop, "speedup": t_loop / t_batched, "seconds_loop_all": t_all,
                     "speedup_all": t_all / t_batched, "same_explanation": same})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "autoencoder": ae.describe()}


def summary(which: str, res: dict) -> str:
    """A Markdown table of the rows and their totals."""
    rows = res["rows"]
    n = len(rows)
    if which == "digits":
        ex, keep = sum(r["exemplars"] for r in rows), sum(r["exemplars_keep"] for r in rows)
        cex, change = sum(r["counter_exemplars"] for r in rows), sum(r["counter_exemplars_change"] for r in rows)
        cf, cfv = sum(r["counterfactuals"] for r in rows), sum(r["counterfactuals_valid"] for r in rows)
        hit = [r["exemplar_hit_rate"] for r in rows if r["exemplar_hit_rate"] is not None]
        chit = [r["counter_hit_rate"] for r in rows if r["counter_hit_rate"] is not None]
        lines = [
            "| images | reconstruction keeps the label | fidelity (mean) | neighbourhood (mean size, share labelled y) "
            "| exemplars found / keep the label | counter-exemplars found / change it | counterfactual rules checked / "
            "change the label | exemplar hit rate (mean) | counter-exemplar hit rate (mean) | model evaluations "
            "(mean) | engine calls (mean) | seconds per explanation (mean, max) |",
            "| ---: | ---: | ---: | :--- | :--- | :--- | :--- | ---: | ---: | ---: | ---: | :--- |",
            f"| {n} | {sum(r['recon_label_kept'] for r in rows)}/{n} | {np.mean([r['fidelity'] for r in rows]):.3f} "
            f"| {np.mean([r['neighbourhood'] for r in rows]):.0f}, "
            f"{np.mean([r['same'] / r['neighbourhood'] for r in rows]):.2f} | {ex} / {keep} | {cex} / {change} "
            f"| {cf} / {cfv} | {np.mean(hit):.3f} | {np.mean(chit):.3f} "
            f"| {np.mean([r['evaluations'] for r in rows]):.0f} | {np.mean([r['engine_calls'] for r in rows]):.1f} "
            f"| {np.mean([r['seconds'] for r in rows]):.2f}, {max(r['seconds'] for r in rows):.2f} |"]
    else:
        lines = ["| image | label | model label | fidelity | exemplars (keep) | counter-exemplars (change) "
                 "| model evaluations | engine calls batched / loop | seconds batched | seconds, model loop "
                 "| speed-up | seconds, model and autoencoder loop | speed-up | same explanation |",
                 "| ---: | ---: | ---: | ---: | :--- | :--- | ---: | :--- | ---: | ---: | ---: | ---: | ---: | :--- |"]
        for r in rows:
            lines.append(f"| {r['image']} | {r['label']} | {r['target']} | {r['fidelity']:.3f} "
                         f"| {r['exemplars']} ({r['exemplars_keep']}) | {r['counter_exemplars']} "
                         f"({r['counter_exemplars_change']}) | {r['evaluations']} | {r['engine_calls_batched']} / "
                         f"{r['engine_calls_loop']} | {r['seconds_batched']:.2f} | {r['seconds_loop']:.2f} "
                         f"| {r['speedup']:.1f}x | {r['seconds_loop_all']:.2f} | {r['speedup_all']:.1f}x "
                         f"| {r['same_explanation']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["digits", "fashion"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="Write the rows here.")
    args = ap.parse_args()
    res = digits(args.limit or 20) if args.which == "digits" else fashion(args.limit or 3)
    res["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread"
    res["command"] = "python benchmarks/abele_speed.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(summary(args.which, res))
    print(f"command: {res['command']}; machine: {res['machine']}")


if __name__ == "__main__":
    main()
