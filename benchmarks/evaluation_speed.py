"""Evaluation speed: onnxsal's metrics against Quantus 0.6.0 on the same model and maps.

The model: the paper's Fashion-MNIST CNN (benchmarks/paper/models/fashion_cnn.onnx), loaded
into its torch definition (benchmarks/models/paper_models.py) and exported again with
torch.onnx.export; Quantus runs the torch module, onnxsal the ONNX export, both with T
threads (torch.set_num_threads(T), onnxruntime threads=T). The maps: onnxsal's ``vanilla``
(the signed gradient of the predicted logit) of the first N Fashion-MNIST test images, given
to both; ``y_batch`` is the predicted class (onnxsal's target). Each metric is configured to
the same definition in both tools (docs/metrics.md#parity-with-quantus); where Quantus draws at
random, its draws are replaced by onnxsal's (faithfulness correlation's subsets,
max-sensitivity's noise), so the scores can be compared number by number. onnxsal's metrics
are called directly (``Metric.evaluate``), not through ``onnxsal evaluate``: the time is the
metric's alone, as Quantus's is. Quantus gets ``batch_size=N`` (its fastest setting here).

    OMP_NUM_THREADS=1 python benchmarks/evaluation_speed.py --n 256 --threads 1 \\
        --out benchmarks/results/evaluation_speed
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_model(threads: int):
    """(torch CNN with the paper model's weights, onnxsal Engine on its torch.onnx export)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from benchmarks.models.paper_models import paper_cnn
    from onnxsal.engine import Engine

    src = onnx.load(ROOT / "benchmarks/paper/models/fashion_cnn.onnx")
    net = paper_cnn(10, 1).eval()
    net.load_state_dict({i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
                         for i in src.graph.initializer})
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, 28, 28), f, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_from_string(f.getvalue())
    return net, model, Engine(model, threads=threads, use_disk_cache=False)


def explain_torch(model, inputs, targets, **kwargs):
    """Quantus's explain_func: the signed gradient of the target logit (torch autograd)."""
    import torch

    xt = torch.tensor(np.asarray(inputs, np.float32), requires_grad=True)
    out = model(xt)
    out[torch.arange(len(xt)), torch.as_tensor(np.asarray(targets, np.int64))].sum().backward()
    return xt.grad.sum(dim=1, keepdim=True).numpy()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Ctx:
    def __init__(self, net, model, engine, x, y, maps, threads):
        self.net, self.model, self.engine = net, model, engine
        self.x, self.y, self.maps, self.threads = x, y, maps, threads
        self.n = len(x)

    def quantus(self, metric, a=None, **extra):
        kw = dict(model=self.net, x_batch=self.x, y_batch=self.y,
                  a_batch=(self.maps if a is None else a)[:, None], channel_first=True,
                  device="cpu", softmax=False, batch_size=self.n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metric(**{**kw, **extra})

    def onnxsal(self, metric):
        return metric.evaluate(self.engine.logits, self.x, self.maps)


def pixel_flipping(c: Ctx, steps: int = 16) -> dict:
    """``steps`` evenly sized steps (784: one pixel a step, Quantus's default
    features_in_step=1)."""
    import quantus

    from onnxsal.metrics import base

    step = c.x[0].size // steps
    t_o, res = timed(lambda: c.onnxsal(base.get("region-perturbation-morf")(patch=1,
                                                                           steps=steps)))
    t_q, qc = timed(lambda: c.quantus(quantus.PixelFlipping(
        features_in_step=step, perturb_baseline="black", normalise=False,
        disable_warnings=True)))
    qc = np.asarray(qc, np.float64)
    # maps with tied values (exact zeros of the gradient): Quantus's argsort (quicksort) and
    # onnxsal's stable order may remove tied pixels in another order
    untied = np.array([len(np.unique(m)) == m.size for m in c.maps])
    diff = np.abs(res["curve"][:, 1:] - qc).max(axis=1)
    return {"onnxsal": f"region-perturbation-morf(patch=1, steps={steps})",
            "quantus": f"PixelFlipping(features_in_step={step}, perturb_baseline='black', "
                       "normalise=False)",
            "t_onnxsal": t_o, "t_quantus": t_q,
            "max_diff": float(diff[untied].max()),
            "max_diff_all_images": float(diff.max()),
            "compared": f"the target logit after each of the {steps} steps, the "
                        f"{int(untied.sum())} images whose map has no tied values (all "
                        f"{c.n}: {diff.max():.2g})"}


def road(c: Ctx) -> dict:
    import quantus

    from onnxsal.metrics import base

    pct = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    hw = c.x[0, 0].size  # Quantus removes int(H W p / 100) pixels, onnxsal round(p H W): same k
    m = base.get("road-morf")(percentages=[int(hw * p / 100) / hw for p in pct], noise=0.0)
    t_o, res = timed(lambda: c.onnxsal(m))
    t_q, qres = timed(lambda: c.quantus(quantus.ROAD(percentages=pct, noise=0.0,
                                                     disable_warnings=True)))
    # Quantus reports the top-1 agreement per percentage: the same from onnxsal's imputed images
    var = m.variants(c.x, c.maps)
    pred = c.engine.logits(var.reshape((-1,) + c.x.shape[1:])).argmax(1).reshape(c.n, -1)
    acc = (pred == c.y[:, None]).mean(axis=0)
    return {"onnxsal": "road-morf(percentages=int(784 p)/784 for p = 0.1..0.9, noise=0)",
            "quantus": "ROAD(percentages=[10, ..., 90], noise=0)",
            "t_onnxsal": t_o, "t_quantus": t_q,
            "max_diff": float(np.abs(np.asarray([qres[p] for p in pct]) - acc).max()),
            "compared": "top-1 agreement per percentage (Quantus's output) on the same imputations"}


def faithfulness_correlation(c: Ctx) -> dict:
    import quantus

    from onnxsal.metrics import base

    m = base.get("faithfulness-correlation")(subset=0.1, runs=100)
    t_o, res = timed(lambda: c.onnxsal(m))
    sub = m.subsets(c.x)
    size = int(sub[0, 0].sum())
    draws = iter([np.flatnonzero(sub[i, r]) for r in range(m.runs) for i in range(c.n)])
    choice = np.random.choice
    np.random.choice = lambda *args, **kw: next(draws)  # Quantus draws onnxsal's subsets
    try:
        t_q, qv = timed(lambda: c.quantus(quantus.FaithfulnessCorrelation(
            nr_runs=m.runs, subset_size=size, perturb_baseline="black", return_aggregate=False,
            disable_warnings=True)))
    finally:
        np.random.choice = choice
    return {"onnxsal": "faithfulness-correlation(subset=0.1, runs=100)",
            "quantus": f"FaithfulnessCorrelation(nr_runs=100, subset_size={size}, "
                       "perturb_baseline='black'), np.random.choice replaying onnxsal's subsets",
            "t_onnxsal": t_o, "t_quantus": t_q,
            "max_diff": float(np.abs(np.asarray(qv, np.float64) - res["value"]).max()),
            "compared": "Pearson r per image"}


def max_sensitivity(c: Ctx, samples: int) -> dict | None:
    import quantus

    from onnxsal import methods
    from onnxsal.metrics import base

    if "max-sensitivity" not in base.names():
        return None

    def explain_onnx(images, targets):
        return methods.compute(c.engine, images, ["vanilla"], targets=targets)["vanilla"].maps

    m = base.get("max-sensitivity")(explain_onnx, samples=samples, radius=0.1, seed=0)
    t_o, res = timed(lambda: c.onnxsal(m))
    m._start = 0
    xp = m.perturb(c.x)  # [N, S, C, H, W]: the draws onnxsal made
    calls = iter(range(samples))

    def replay(arr, indices, **kwargs):
        return xp[:, next(calls)].reshape(len(arr), -1).astype(arr.dtype)

    t_q, qv = timed(lambda: c.quantus(quantus.MaxSensitivity(
        nr_samples=samples, lower_bound=0.1, perturb_func=replay, disable_warnings=True),
        explain_func=explain_torch))
    qv = np.asarray(qv, np.float64)
    return {"onnxsal": f"max-sensitivity(vanilla, samples={samples}, radius=0.1)",
            "quantus": f"MaxSensitivity(nr_samples={samples}, lower_bound=0.1), torch-autograd "
                       "gradient explain_func, perturb_func replaying onnxsal's noise",
            "t_onnxsal": t_o, "t_quantus": t_q,
            "max_diff": float(np.abs(qv - res["value"]).max()),
            "max_rel_diff": float((np.abs(qv - res["value"]) / np.abs(qv)).max()),
            "compared": "max-sensitivity per image"}


def smooth_mprt(c: Ctx, samples: int) -> dict | None:
    """onnxsal smooth-mprt vs Quantus SmoothMPRT(skip_layers=True, return_last_correlation=True)
    on the same fully randomised model (Quantus's layer generator yields the torch net with
    onnxsal's random weights) and the same noise (Quantus's np.random.randn replays onnxsal's
    standard normal draws)."""
    import copy

    import quantus
    import torch
    from onnx import numpy_helper
    from quantus.helpers.model.pytorch_model import PyTorchModel

    from onnxsal.metrics import base
    from onnxsal.metrics.randomisation import randomize
    from onnxsal.metrics.randomisation_mprt import model_explainer
    from onnxsal.metrics.sanity import find_layers

    if "smooth-mprt" not in base.names():
        return None
    m = base.get("smooth-mprt")(c.model, model_explainer("vanilla", threads=c.threads,
                                                         use_disk_cache=False),
                                samples=samples)
    t_o, res = timed(lambda: c.onnxsal(m))
    values = {t.name: numpy_helper.to_array(t)
              for t in randomize(c.model, find_layers(c.model), seed=0).graph.initializer}
    twin = copy.deepcopy(c.net)
    state = twin.state_dict()
    twin.load_state_dict({k: torch.tensor(values[k].reshape(state[k].shape)) for k in state})
    # onnxsal clips the noisy copies to [0, 1], Quantus does not: Quantus's randn returns the
    # standard normal draw that gives onnxsal's clipped copy (x + std * z = clip(...))
    m._start = 0
    std = m.noise * (c.x.max(axis=(1, 2, 3)) - c.x.min(axis=(1, 2, 3)))[:, None, None, None, None]
    z = ((m.noisy(c.x)[:, :-1].astype(np.float64) - c.x[:, None]) / std)
    calls = []

    def randn(*shape):
        calls.append(1)
        return z[:, (len(calls) - 1) % (samples - 1)]

    def generator(self, order="top_down", seed=42):
        names = [n for n, mod in c.net.named_modules() if list(mod.parameters(recurse=False))]
        for name in names:
            yield name, twin

    gen, rn = PyTorchModel.get_random_layer_generator, np.random.randn
    PyTorchModel.get_random_layer_generator, np.random.randn = generator, randn
    try:
        t_q, qv = timed(lambda: c.quantus(quantus.SmoothMPRT(
            nr_samples=samples, skip_layers=True, return_last_correlation=True,
            disable_warnings=True), a_batch=None, explain_func=explain_torch))
    finally:
        PyTorchModel.get_random_layer_generator, np.random.randn = gen, rn
    qv = np.asarray(qv, np.float64)
    return {"onnxsal": f"smooth-mprt(vanilla, samples={samples}, noise=0.1)",
            "quantus": f"SmoothMPRT(nr_samples={samples}, skip_layers=True, "
                       "return_last_correlation=True), onnxsal's random weights and (clipped) noise",
            "t_onnxsal": t_o, "t_quantus": t_q,
            "max_diff": float(np.abs(qv - res["value"]).max()),
            "compared": "Spearman of the smoothed maps, trained vs fully random, per image"}


def cascading_spearman(c: Ctx) -> np.ndarray:
    """onnxsal's cascading randomisation with Quantus MPRT's score alone: per step (top layer
    first, onnxsal.metrics.randomisation), the vanilla maps of the randomised ONNX model and
    their Spearman correlation of |map| with the original |map|; [steps, N]."""
    from onnxsal import methods
    from onnxsal.engine import Engine
    from onnxsal.metrics.randomisation import cascading_steps, randomize
    from onnxsal.metrics.sanity import find_layers
    from onnxsal.metrics.similarity import spearman

    ref = np.abs(c.maps)
    out = []
    for step in cascading_steps(find_layers(c.model)):
        e = Engine(randomize(c.model, step, seed=0), threads=c.threads, use_disk_cache=False)
        m = np.abs(methods.compute(e, c.x, ["vanilla"], targets=c.y)["vanilla"].maps)
        out.append([spearman(a, b) for a, b in zip(ref, m, strict=True)])
    return np.asarray(out)


def mprt(c: Ctx) -> dict:
    import quantus

    from onnxsal.sanity_run import run_sanity

    t_o, sp = timed(lambda: cascading_spearman(c))
    with tempfile.TemporaryDirectory() as out:
        t_full, _ = timed(lambda: run_sanity(c.model, c.x, ["vanilla"], os.path.join(out, "s"),
                                             mode="cascading", threads=c.threads, plots=False))
    t_q, qres = timed(lambda: c.quantus(quantus.MPRT(
        layer_order="top_down", seed=42, disable_warnings=True), explain_func=explain_torch))
    q_layers = [float(np.mean(v)) for v in qres.values()]
    return {"onnxsal": f"cascading randomisation, {len(sp)} steps top-down (randomize, "
                       "Engine, vanilla maps, similarity.spearman of abs(map))",
            "quantus": "MPRT(layer_order='top_down') with the torch-autograd gradient "
                       f"explain_func: {len(qres)} layers",
            "t_onnxsal": t_o, "t_quantus": t_q, "max_diff": None,
            "t_onnxsal_run_sanity": t_full,
            "run_sanity_note": "onnxsal.sanity_run.run_sanity (cascading, vanilla, no plots): "
                               "also SSIM, HOG and signed/abs Spearman per step, a report",
            "quantus_mean_spearman_per_layer": q_layers,
            "onnxsal_mean_spearman_per_step": [float(np.nanmean(v)) for v in sp],
            "compared": "not number by number: each tool draws its own random weights "
                        "(mean Spearman per step listed)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=20, help="max-sensitivity draws")
    p.add_argument("--smooth-samples", type=int, default=10, help="smooth MPRT samples")
    p.add_argument("--only", default="", help="comma list of metrics to run (default all)")
    p.add_argument("--out", default="benchmarks/results/evaluation_speed")
    a = p.parse_args(argv)

    import onnxruntime
    import quantus
    import torch

    from onnxsal import methods
    from onnxsal.data import load_dataset

    torch.set_num_threads(a.threads)
    net, model, engine = load_model(a.threads)
    x = load_dataset("fashion-mnist", shape=(1, 28, 28), limit=a.n).images.astype(np.float32)
    y = engine.logits(x).argmax(1)
    with torch.no_grad():
        tdiff = float(np.abs(net(torch.from_numpy(x)).numpy() - engine.logits(x)).max())
    maps = methods.compute(engine, x, ["vanilla"], targets=y)["vanilla"].maps
    c = Ctx(net, model, engine, x, y, np.asarray(maps, np.float32), a.threads)
    runs = {"pixel-flipping": pixel_flipping,
            "pixel-flipping-1px": lambda c: pixel_flipping(c, c.x[0].size), "road": road,
            "max-sensitivity": lambda c: max_sensitivity(c, a.samples),
            "faithfulness-correlation": faithfulness_correlation, "mprt": mprt,
            "smooth-mprt": lambda c: smooth_mprt(c, a.smooth_samples)}
    only = [s for s in a.only.split(",") if s]
    rows = {}
    for name, fn in runs.items():
        if only and name not in only:
            continue
        print(f"{name} ...", flush=True)
        r = fn(c)
        if r is None:
            print(f"  {name}: not registered in this tree, skipped", flush=True)
            continue
        r["ratio"] = r["t_quantus"] / r["t_onnxsal"]
        r["images_per_s_onnxsal"] = a.n / r["t_onnxsal"]
        r["images_per_s_quantus"] = a.n / r["t_quantus"]
        rows[name] = r
        print(f"  onnxsal {r['t_onnxsal']:.2f} s, Quantus {r['t_quantus']:.2f} s, "
              f"ratio {r['ratio']:.1f}x, max diff {r['max_diff']}", flush=True)
    info = {"command": "OMP_NUM_THREADS=1 python benchmarks/evaluation_speed.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "n": a.n, "threads": a.threads, "machine": {
                "platform": platform.platform(), "processor": platform.processor(),
                "cpus": os.cpu_count(), "python": platform.python_version()},
            "versions": {"quantus": quantus.__version__, "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
            "torch_vs_onnx_max_logit_diff": tdiff, "metrics": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(info))
    print(json.dumps(info, indent=2))
    return 0


def markdown(info: dict) -> str:
    """The results table (one row per metric) with the run's settings."""
    m, v = info["machine"], info["versions"]
    lines = ["# Evaluation speed: onnxsal vs Quantus", "",
             "Written by `benchmarks/evaluation_speed.py` (its docstring says what is compared "
             "and how); one run:", "", f"    {info['command']}", "",
             f"- N = {info['n']} Fashion-MNIST test images (28x28), the paper's CNN, "
             f"{info['threads']} thread(s) for both (torch.set_num_threads, onnxruntime threads)",
             f"- machine: {m['platform']}, {m['cpus']} CPUs (shared), Python {m['python']}",
             f"- versions: Quantus {v['quantus']}, torch {v['torch']}, onnxruntime "
             f"{v['onnxruntime']}, numpy {v['numpy']}",
             f"- torch vs ONNX logits: max |difference| {info['torch_vs_onnx_max_logit_diff']:.1e}",
             "- onnxsal's metrics are called directly (`Metric.evaluate`), not through "
             "`onnxsal evaluate`; Quantus with `batch_size=N`", "",
             "| metric | onnxsal | Quantus | onnxsal s | Quantus s | onnxsal img/s | "
             "Quantus img/s | ratio | max \\|score difference\\| (what) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in info["metrics"].items():
        diff = "n/a" if r["max_diff"] is None else f"{r['max_diff']:.2g}"
        lines.append(f"| {name} | {r['onnxsal']} | {r['quantus']} | {r['t_onnxsal']:.2f} | "
                     f"{r['t_quantus']:.2f} | {r['images_per_s_onnxsal']:.1f} | "
                     f"{r['images_per_s_quantus']:.1f} | {r['ratio']:.2f}x | "
                     f"{diff} ({r['compared']}) |")
    extra = info["metrics"].get("mprt")
    if extra:
        lines += ["", f"MPRT: onnxsal's full `run_sanity` took {extra['t_onnxsal_run_sanity']:.2f} s "
                  f"({extra['run_sanity_note']}). Mean Spearman per step, Quantus (its first "
                  "entry is the original model): "
                  + ", ".join(f"{x:.3f}" for x in extra["quantus_mean_spearman_per_layer"])
                  + "; onnxsal: " + ", ".join(f"{x:.3f}" for x in
                                              extra["onnxsal_mean_spearman_per_step"]) + "."]
    lines += ["", "Reading. Both tools run about the same model evaluations for a metric "
              "configured to the same definition (the same steps, subsets, draws), so the ratio "
              "measures onnxruntime against torch on one thread plus each tool's overhead; "
              "onnxsal stacks all the variants of a batch into one call, Quantus loops over "
              "steps or draws. Below the goal of 10x in this run: "
              + (", ".join(f"{k} ({r['ratio']:.2f}x)" for k, r in info["metrics"].items()
                           if r["ratio"] < 10) or "none") + ". The MPRT row builds "
              "an Engine (session and gradient graph) per randomisation step, inside its time. "
              "Regenerate the table from the JSON: `python -c \"import json, "
              "benchmarks.evaluation_speed as e; print(e.markdown(json.load(open("
              "'benchmarks/results/evaluation_speed.json'))))\"`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
