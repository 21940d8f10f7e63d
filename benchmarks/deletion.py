"""The black/white-deletion protocol (docs/definitions.md#deletion) on the Fashion-MNIST test images with the
paper's CNN: onnxsal's benchmark driver against a plain torch implementation written the way
the authors' code works, measured side by side in one run (issue 7).

The torch side loops like the authors' evaluation code: for each map, for each fraction, over
the test set in batches of 128, it computes the saliency maps with torch autograd (one backward
for original/positive/negative, a loop of one backward per class for active/inactive), deletes
the pixels (black and white from the same map) and counts correct top-1 predictions. The maps
are therefore recomputed for every fraction, as in that code.

onnxsal's side is ``onnxsal.benchmark.run_benchmark`` (what ``onnxsal benchmark`` runs): maps
once per image, the five maps from one batched all-classes backward, every deleted variant in
large onnxruntime batches, with a fresh augmented-model cache and output folder, so the time
includes building the gradient graph.

Both use the same weights (``benchmarks/paper/models/fashion_cnn.{pt,onnx}``, else a seeded
``paper_cnn(10, in_channels=1)`` exported here) and the same thread count. The AUCs are
asserted equal up to float rounding of the gradients (the maximum difference is printed).

    python benchmarks/deletion.py                 # all 10k test images
    python benchmarks/deletion.py --limit 512     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# passive OpenMP waits: spinning torch threads on a shared, loaded machine made torch up to 30x
# slower here (see gradients.py); this only helps the torch side
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MAPS = ("original", "positive", "negative", "active", "inactive")
FRACTIONS = tuple(i / 10 for i in range(10))
PAPER = ROOT / "benchmarks" / "paper" / "models"


def load_model(workdir: Path):
    """(torch module, onnx path): the paper's Fashion-MNIST CNN with the same weights."""
    import torch

    from benchmarks.models.paper_models import paper_cnn

    torch.manual_seed(0)
    m = paper_cnn(10, in_channels=1)
    pt, onx = PAPER / "fashion_cnn.pt", PAPER / "fashion_cnn.onnx"
    if pt.is_file() and onx.is_file():
        m.load_state_dict(torch.load(pt, weights_only=True))
        return m.eval(), onx
    from converters.torch_export import export

    onx = workdir / "fashion_cnn_seeded.onnx"
    m.eval()
    export(m, (1, 1, 28, 28), onx)
    return m, onx


# -- the torch reference, the authors' way -----------------------------------------------
def torch_maps(model, x, method: str):
    """[N, H, W] saliency maps with torch autograd (docs/definitions.md#signed-maps)."""
    import torch

    x = x.clone().requires_grad_(True)
    logits = model(x)
    t = logits.argmax(dim=1)
    n = len(x)
    if method in ("original", "positive", "negative"):
        (g,) = torch.autograd.grad(logits[torch.arange(n), t].sum(), x)
        if method == "original":
            raw = g.abs()
        elif method == "positive":
            raw = g.clamp(min=0)
        else:
            raw = (-g).clamp(min=0)
        return raw.amax(dim=1)
    classes = logits.shape[1]
    grads = []
    for q in range(classes):
        (g,) = torch.autograd.grad(logits[:, q].sum(), x, retain_graph=q < classes - 1)
        grads.append(g)
    G = torch.stack(grads)  # [Q, N, C, H, W]
    gc = G[t, torch.arange(n)]
    other = torch.arange(classes)[:, None] != t[None, :]  # [Q, N]
    sel = other[:, :, None, None, None]
    if method == "active":
        gmax = torch.where(sel, G, torch.tensor(-torch.inf)).amax(dim=0)
        raw = torch.where(gc > gmax, gc, torch.zeros(()))
    else:
        gmin = torch.where(sel, G, torch.tensor(torch.inf)).amin(dim=0)
        raw = torch.where(gc < gmin, gc, torch.zeros(()))
    return raw.abs().amax(dim=1)


def torch_delete(x, maps, p: float, fill: float):
    """Delete the pixels with s > v and s != 0, v = the k-th largest value, k = round(p*H*W)."""
    import torch

    n, h, w = maps.shape
    k = int(round(p * h * w))
    desc = torch.sort(maps.reshape(n, -1), dim=1, descending=True).values
    desc = torch.cat([desc, torch.full((n, 1), -torch.inf)], dim=1)
    v = desc[:, k]
    mask = (maps > v[:, None, None]) & (maps != 0)
    return torch.where(mask[:, None], torch.tensor(fill), x)


def torch_protocol(model, images: np.ndarray, labels: np.ndarray, batch: int = 128) -> dict:
    import torch

    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    curves: dict[str, dict[str, list[float]]] = {}
    t_maps = 0.0
    for method in MAPS:
        curves[method] = {"black": [], "white": []}
        for p in FRACTIONS:
            correct = {"black": 0, "white": 0}
            for i in range(0, len(x_all), batch):
                x, y = x_all[i:i + batch], y_all[i:i + batch]
                t0 = time.perf_counter()
                maps = torch_maps(model, x, method).detach()
                t_maps += time.perf_counter() - t0
                with torch.no_grad():
                    for colour, fill in (("black", 0.0), ("white", 1.0)):
                        pred = model(torch_delete(x, maps, p, fill)).argmax(dim=1)
                        correct[colour] += int((pred == y).sum())
            for colour in correct:
                curves[method][colour].append(correct[colour] / len(x_all))
    auc = {m: {c: float(np.trapezoid(np.asarray(v, np.float64), dx=0.1)) for c, v in cs.items()}
           for m, cs in curves.items()}
    return {"curves": curves, "auc": auc, "maps_s": t_maps}


def onnxsal_protocol(onnx_path: Path, limit: int | None, threads: int, workdir: Path) -> dict:
    from onnxsal.benchmark import run_benchmark

    os.environ["ONNXSAL_CACHE"] = str(workdir / "cache")  # fresh: graph building is timed
    res = run_benchmark([str(onnx_path)], "fashion-mnist", list(MAPS), metric="accuracy",
                        limit=limit, out_dir=workdir / "onnxsal_out", device="cpu",
                        threads=threads, progress=False)
    curves = {r["method"]: r["curves"] for r in res["results"]}
    auc = {r["method"]: r["auc"] for r in res["results"]}
    return {"curves": curves, "auc": auc}


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default: all 10k)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true", help="time onnxsal only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deletion"))
    a = ap.parse_args()

    import torch

    from onnxsal.data import load_fashion_mnist

    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, onx = load_model(tmp)
        t0 = time.perf_counter()
        ours = onnxsal_protocol(onx, a.limit, a.threads, tmp)
        t_ours = time.perf_counter() - t0
        print(f"onnxsal: {t_ours:.1f} s", flush=True)
        ref, t_torch = None, None
        if not a.skip_torch:
            t0 = time.perf_counter()
            raw = load_fashion_mnist("test", limit=a.limit)
            images = np.stack([im.transpose(2, 0, 1) for im in raw.images]).astype(np.float32)
            ref = torch_protocol(model, images, np.asarray(raw.labels, np.int64))
            t_torch = time.perf_counter() - t0
            print(f"torch:   {t_torch:.1f} s", flush=True)
    load_end = os.getloadavg()

    rows, max_diff = [], 0.0
    for m in MAPS:
        for c in ("black", "white"):
            o = ours["auc"][m][c]
            r = ref["auc"][m][c] if ref else None
            if r is not None:
                max_diff = max(max_diff, abs(o - r))
            rows.append({"map": m, "colour": c, "onnxsal_auc": o, "torch_auc": r})
    command = "python benchmarks/deletion.py " + " ".join(sys.argv[1:])
    n_images = a.limit or 10000
    result = {
        "command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1_5_15": {"start": [round(v, 2) for v in load_start],
                                "end": [round(v, 2) for v in load_end]},
        "images": n_images, "threads": a.threads, "model": str(onx.relative_to(ROOT)) if
        str(onx).startswith(str(ROOT)) else "paper_cnn(10, in_channels=1), seed 0",
        "onnxsal_s": t_ours, "torch_s": t_torch,
        "torch_maps_s": ref["maps_s"] if ref else None,
        # the same torch code with each map computed once instead of once per fraction
        "torch_maps_once_s": (t_torch - ref["maps_s"] * (1 - 1 / len(FRACTIONS))) if ref else None,
        "speedup": (t_torch / t_ours) if t_torch else None,
        "max_abs_auc_diff": max_diff if ref else None, "rows": rows,
        "onnxsal_curves": ours["curves"], "torch_curves": ref["curves"] if ref else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# Black/white deletion: onnxsal vs the authors' way in torch\n",
             f"Command: `{command}`  ",
             f"Machine: {result['machine']}  ",
             f"Load average (1/5/15 min) at start {result['load_average_1_5_15']['start']}, "
             f"at end {result['load_average_1_5_15']['end']} (2 cores shared with other jobs)  ",
             f"Model: {result['model']}; {n_images} Fashion-MNIST test images; 5 maps x 2 colours "
             f"x 10 fractions; {a.threads} threads each\n",
             "| | wall time s |", "|---|---|", f"| onnxsal benchmark | {t_ours:.1f} |"]
    if t_torch:
        once = result["torch_maps_once_s"]
        lines += [f"| torch, authors' loops (batch 128) | {t_torch:.1f} |",
                  f"| (of which saliency maps, recomputed for every fraction) | {ref['maps_s']:.1f} |",
                  f"| torch with each map computed once (derived: maps / 10) | {once:.1f} |",
                  f"\nSpeed-up: **{t_torch / t_ours:.1f}x** over the authors' loops, "
                  f"{once / t_ours:.1f}x over torch with maps computed once; largest AUC "
                  f"difference: {max_diff:.2e}\n"]
    lines += ["| map | colour | AUC onnxsal | AUC torch |", "|---|---|---|---|"]
    for r in rows:
        tr = "-" if r["torch_auc"] is None else f"{r['torch_auc']:.6f}"
        lines.append(f"| {r['map']} | {r['colour']} | {r['onnxsal_auc']:.6f} | {tr} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if ref is not None:
        assert max_diff < 1e-9, f"AUCs differ by up to {max_diff}"


if __name__ == "__main__":
    main()
