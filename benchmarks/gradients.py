"""Gradients of every class for a batch: onnxsal's engine against torch autograd, same weights,
same threads, measured side by side in one run (issue 7).

For each model it times
  * torch eager, one forward then a loop of backward passes (retain_graph), one per class;
  * torch.func: vmap over vjp with one-hot cotangents (chunked like onnxsal for 1000 classes);
  * onnxsal: Engine.class_gradients (the augmented ONNX model on onnxruntime);
  * the floor: (K + 1) x onnxruntime's forward time for the same batch (the faster of a plain
    session with the same threads and the engine's own forward);
and prints ratios (best torch / onnxsal, onnxsal / floor), plus the largest gradient difference
between onnxsal and torch. Results go to benchmarks/results/gradients.{json,md}.

    python benchmarks/gradients.py                       # all models (slow: ~20 min on 2 cores)
    python benchmarks/gradients.py --models cnn resnet18_32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# torch's OpenMP threads spin-wait by default; on a shared, loaded machine a spinning thread
# whose partner is descheduled made torch up to 30x slower (measured here). Passive waiting
# costs nothing on a quiet machine, so torch gets it (onnxruntime does not use OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name: (builder, input size, batch, classes, chunk of seed rows, torch-loop class cap,
#        torch vmap chunk: 100 seed rows ran out of 16 GB in torch.func on the 224 px models,
#        classes timed: every variant computes the gradients of the first that many classes
#        (ViT-B/16: 1000 classes take ~15 min per variant here), the floor counts them too)
MODELS = {
    "cnn": ("paper_cnn", 32, 32, 10, None, None, None, None),
    "resnet18_32": ("paper_resnet18", 32, 32, 10, None, None, None, None),
    # torch.func vmap over mobilenet_v3_small needed > 16 GB even at 10 seed rows: skipped (0)
    "mobilenet_v3_small": ("mobilenet_v3_small", 224, 2, 1000, 100, 100, 0, None),
    "resnet18_224": ("resnet18", 224, 2, 1000, 100, 100, 10, None),
    "vit_b_16": ("vit_b_16", 224, 1, 1000, 50, 50, 10, 100),
}


def build(kind: str, classes: int):
    import torch
    import torchvision

    from benchmarks.models.paper_models import paper_cnn, paper_resnet18

    torch.manual_seed(0)
    if kind == "paper_cnn":
        m = paper_cnn(classes)
    elif kind == "paper_resnet18":
        m = paper_resnet18(classes)
    else:
        m = getattr(torchvision.models, kind)(weights=None, num_classes=classes)
        if kind.startswith("vit"):  # torchvision zero-initialises the ViT head: all gradients 0
            torch.nn.init.normal_(m.heads.head.weight, std=0.02)
    return m.eval()


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_loop(m, x, classes, cap=None):
    """One forward, then one backward per class (the first ``cap`` classes when given)."""
    import torch

    xt = x.clone().requires_grad_(True)
    y = m(xt)
    out = []
    n = min(classes, cap or classes)
    for k in range(n):
        (g,) = torch.autograd.grad(y[:, k].sum(), xt, retain_graph=k < n - 1)
        out.append(g)
    return torch.stack(out)


def torch_vmap(m, x, classes, chunk):
    """vmap over vjp with the one-hot cotangents of the first ``classes`` classes."""
    import torch
    from torch.func import vjp, vmap

    y, pull = vjp(m, x)
    eye = torch.eye(y.shape[1], dtype=y.dtype)[:classes]
    out = []
    step = chunk or classes
    for i in range(0, classes, step):
        cot = eye[i:i + step, None, :].expand(-1, x.shape[0], -1)
        out.append(vmap(pull)(cot)[0])
    return torch.cat(out)


def run_model(name: str, threads: int, repeat: int, workdir: Path) -> dict:
    import torch

    from converters.torch_export import export
    from onnxsal.engine import Engine
    from onnxsal.onnx_util import cpu_session

    kind, size, batch, n_logits, chunk, cap, vchunk, timed = MODELS[name]
    classes = timed or n_logits  # gradients of classes 0..classes-1
    if n_logits <= 10:  # the 32 px models take well under a second: more repeats, less noise
        repeat = max(repeat, 7)
    torch.set_num_threads(threads)
    m = build(kind, n_logits)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    path = workdir / f"{name}.onnx"
    export(m, x[:1], path, opset=17)
    eng = Engine(path, device="cpu", threads=threads, cache_dir=workdir / "cache",
                 memory_budget_mb=3072)
    xn = x.numpy()

    keep = min(classes, cap or classes)  # the classes checked against the torch loop

    def onnxsal_all():
        out, n = [], 0
        for cls, g in eng.class_gradients(xn, np.arange(classes), chunk=chunk):
            if n < keep:
                out.append(g[:keep - n])
            n += len(cls)
        assert n == classes
        return np.concatenate(out)

    t0 = time.perf_counter()
    eng.augmented()  # build once: augmentation time is reported separately
    augment_s = time.perf_counter() - t0
    ours = onnxsal_all()  # warm-up and correctness
    t_ours = best_of(onnxsal_all, repeat)

    fwd = cpu_session(path, threads)
    feed = {fwd.get_inputs()[0].name: xn}
    fwd.run(None, feed)
    t_fwd_plain = best_of(lambda: fwd.run(None, feed), max(repeat, 3))
    # the engine's own forward (data-parallel runs with threads > 1) may be faster: the floor
    # takes the faster of the two
    eng.logits(xn)
    t_fwd_engine = best_of(lambda: eng.logits(xn), max(repeat, 3))
    t_fwd = min(t_fwd_plain, t_fwd_engine)

    with torch.no_grad():
        m(x)
    t_torch_fwd = best_of(lambda: m(x), max(repeat, 3))
    loop_ref = torch_loop(m, x, classes, cap)  # warm-up and oracle
    t_loop = best_of(lambda: torch_loop(m, x, classes, cap), repeat)
    if cap and cap < classes:
        # 1000 backward passes take too long here: time the first `cap` and scale the
        # backward part linearly (every class costs the same backward)
        t_loop = t_torch_fwd + (t_loop - t_torch_fwd) * classes / cap
    t_vmap = None
    if vchunk != 0:
        try:
            torch_vmap(m, x, classes, vchunk)
            t_vmap = best_of(lambda: torch_vmap(m, x, classes, vchunk), repeat)
        except Exception as exc:  # some models do not vmap (in-place ops), or run out of memory
            print(f"  {name}: torch.func vmap failed: {type(exc).__name__}: {str(exc)[:120]}")
    ref = loop_ref.numpy()
    err = float(np.abs(ours[:len(ref)] - ref).max() / (np.abs(ref).max() or 1))
    best_torch = min(t for t in (t_loop, t_vmap) if t is not None)
    floor = (classes + 1) * t_fwd
    row = {
        "model": name, "input": [3, size, size], "batch": batch, "classes": n_logits,
        "classes_timed": classes,
        "chunk": chunk, "torch_vmap_chunk": vchunk, "threads": threads, "augment_s": augment_s,
        "torch_loop_timed_classes": min(classes, cap or classes),
        "onnxsal_s": t_ours, "torch_loop_s": t_loop, "torch_vmap_s": t_vmap,
        "ort_forward_s": t_fwd, "ort_forward_plain_session_s": t_fwd_plain,
        "engine_forward_s": t_fwd_engine, "torch_forward_s": t_torch_fwd, "floor_s": floor,
        "speedup_vs_best_torch": best_torch / t_ours, "ratio_to_floor": t_ours / floor,
        "max_rel_grad_diff": err,
    }
    print(f"  {name}: onnxsal {t_ours:.3f}s  torch loop {t_loop:.3f}s  vmap "
          f"{'-' if t_vmap is None else f'{t_vmap:.3f}s'}  floor {floor:.3f}s  "
          f"speedup {row['speedup_vs_best_torch']:.2f}x  /floor {row['ratio_to_floor']:.2f}  err {err:.1e}")
    return row


def peak_memory_1000_classes(threads: int, workdir: Path) -> dict:
    """Peak RSS of the all-classes Jacobian of a 1000-class 224x224 model (a fresh process)."""
    import subprocess

    import torch
    import torchvision

    from converters.torch_export import export

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    export(m, (1, 3, 224, 224), workdir / "mem_resnet18.onnx")
    # a fresh process without torch (onnxsal's core never imports it); VmHWM, not ru_maxrss,
    # which Linux carries over from the forking parent
    code = f"""
import sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from onnxsal.engine import Engine
eng = Engine({str(workdir / 'mem_resnet18.onnx')!r}, device="cpu", threads={threads},
             cache_dir={str(workdir / 'cache')!r})
x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
n = sum(len(c) for c, _ in eng.class_gradients(x))
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(n, hwm)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, kb = out.stdout.split()[-2:]
    return {"model": "resnet18 224x224, 1000 classes, batch 2 (default memory budget 2 GB)",
            "classes": int(n), "peak_rss_gb": int(kb) / 2**20}


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (1000 classes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gradients"))
    ap.add_argument("--update", action="store_true",
                    help="replace only these models' rows (and memory, if measured) in --out")
    ap.add_argument("--address-space-gb", type=float, default=16.0,
                    help="cap this process's address space (torch.func's vmap on the 224 px "
                         "models otherwise grows until the kernel's OOM killer ends the run; "
                         "under the cap it fails cleanly and is reported as '-'); 0: no cap")
    a = ap.parse_args()
    if a.address_space_gb > 0:
        cap = int(a.address_space_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rows = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            rows.append(run_model(name, a.threads, a.repeat, Path(tmp)))
        mem = peak_memory_1000_classes(a.threads, Path(tmp)) if a.memory else None
    load_end = os.getloadavg()
    command = "python benchmarks/gradients.py " + " ".join(sys.argv[1:])
    if a.update and Path(a.out).with_suffix(".json").is_file():
        old = json.loads(Path(a.out).with_suffix(".json").read_text())
        new = {r["model"]: dict(r, command=command, load_average_1_5_15=[round(v, 2) for v in load_start])
               for r in rows}
        rows = [new.pop(r["model"], r) for r in old["rows"]] + list(new.values())
        mem = mem or old.get("memory")
        command = old["command"] + f"`, then `{command}"
        load_start = old["load_average_1_5_15"]["start"]
    result = {"command": command, "machine": machine(), "rows": rows, "memory": mem,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_1_5_15": {"start": [round(v, 2) for v in load_start],
                                      "end": [round(v, 2) for v in load_end]}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# All-class gradients: onnxsal vs torch autograd\n",
             f"Command: `{command}`  \nMachine: {result['machine']}  ",
             f"Load average (1/5/15 min): {result['load_average_1_5_15']['start']} at start, "
             f"{result['load_average_1_5_15']['end']} at end (2 cores shared with other jobs); "
             f"times are the best of the repeats\n",
             "| model | batch | classes | onnxsal s | torch loop s | torch vmap s | floor (K+1)·fwd s | "
             "speedup vs best torch | onnxsal / floor | max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vm = "-" if r["torch_vmap_s"] is None else f"{r['torch_vmap_s']:.3f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['classes']} | {r['onnxsal_s']:.3f} | "
                     f"{r['torch_loop_s']:.3f} | {vm} | {r['floor_s']:.3f} | "
                     f"{r['speedup_vs_best_torch']:.2f}x | {r['ratio_to_floor']:.2f} | {r['max_rel_grad_diff']:.1e} |")
    partial = [r for r in rows if r["classes_timed"] < r["classes"]]
    if partial:
        lines.append(f"\n{', '.join(r['model'] for r in partial)}: every variant computes the "
                     f"gradients of the first {partial[0]['classes_timed']} classes (of "
                     f"{partial[0]['classes']}); the floor is ({partial[0]['classes_timed']} + 1) x forward.")
    capped = [r["model"] for r in rows if r["torch_loop_timed_classes"] < r["classes_timed"]]
    if capped:
        first = ", ".join(f"{r['model']} {r['torch_loop_timed_classes']}" for r in rows
                          if r["model"] in capped)
        lines.append(f"\nTorch loop: the first backward passes timed ({first}), "
                     f"scaled linearly to all classes (forward counted once); torch vmap and "
                     f"onnxsal compute every class. Max rel. diff: against the torch loop's classes.")
    if mem:
        lines.append(f"\nPeak resident memory, {mem['model']}: {mem['peak_rss_gb']:.2f} GB")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
