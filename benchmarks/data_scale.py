"""Peak memory of `onnxsal benchmark` against the number of images: streaming keeps it flat.

Writes folders of synthetic 224x224 photographs (random crops of scikit-image's sample
photographs, with noise; JPEG, every tenth PNG; one class folder per photograph) in a
temporary folder, a small convolutional net with a 224x224 input exported to ONNX, and runs
`onnxsal benchmark MODEL --data FOLDER -m original` (black/white deletion, one thread) in a
fresh process per size, measuring that process's peak resident memory (``ru_maxrss`` from
``os.wait4``) and its wall time. ``--old-tree`` runs the same with another checkout of
onnxsal (e.g. one with the eager loader) on ``--old-sizes``.

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --sizes 1000 10000 \
        --old-tree /path/to/eager/checkout --old-sizes 1000 2000

Results: benchmarks/results/data_scale.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins"]
SIZE = 224


def make_model(path: Path) -> None:
    """A small CNN (two strided convolutions, global pooling, 7 classes) on [N, 3, 224, 224],
    random weights with seed 0: the memory measured is the data's, not the model's."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=4, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 4, stride=4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, len(SAMPLES))).eval()
    torch.onnx.export(net, torch.zeros(1, 3, SIZE, SIZE), str(path), opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)


def make_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` synthetic photographs in ``root/<sample>/``; returns them in creation order."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    bases = []
    for name in SAMPLES:
        im = np.asarray(getattr(skdata, name)())
        im = im.astype(np.uint8) * 255 if im.dtype == np.bool_ else im.astype(np.uint8)
        bases.append(np.repeat(im[:, :, None], 3, 2) if im.ndim == 2 else im[:, :, :3])
    files = []
    for name in SAMPLES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        c = k % len(SAMPLES)
        base = bases[c]
        h, w = base.shape[:2]
        s = int(rng.uniform(0.5, 1.0) * min(h, w))
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray(base[top:top + s, left:left + s]).resize((SIZE, SIZE), Image.BILINEAR)
        arr = np.asarray(crop, np.float32) + rng.normal(0, 8, (SIZE, SIZE, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        f = root / SAMPLES[c] / f"{k:06d}.{'png' if k % 10 == 9 else 'jpg'}"
        im.save(f, quality=90) if f.suffix == ".jpg" else im.save(f)
        files.append(f)
    return files


def link_subset(files: list[Path], src_root: Path, dst_root: Path, n: int) -> None:
    for f in files[:n]:
        d = dst_root / f.relative_to(src_root)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, d)


BENCH = """import sys
from onnxsal.benchmark import run_benchmark
model, data, out, method, fractions, shard = sys.argv[1:7]
run_benchmark([model], data, [method], out_dir=out, threads=1, device="cpu", progress=False,
              fractions=[float(f) for f in fractions.split(",")], modes=("black",),
              shard_size=int(shard))
"""


def _which_onnxsal(tree: Path, env: dict, cwd: Path) -> str:
    """The folder onnxsal is imported from in the benchmark's process."""
    return subprocess.run([sys.executable, "-c", "import onnxsal; print(onnxsal.__file__)"], env=env,
                          cwd=cwd, capture_output=True, text=True).stdout.strip()


def run(tree: Path, model: Path, data: Path, out: Path, method: str, fractions: str,
        shard: int = 256) -> dict:
    """One benchmark (`onnxsal.benchmark.run_benchmark`, what `onnxsal benchmark` runs, with
    ``fractions`` and black deletion only, to keep the run short) in a fresh process: its peak
    RSS (MB), seconds, the data fingerprint and the AUC."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", BENCH, str(model), str(data), str(out), method, fractions, str(shard)]
    t0 = time.time()
    # cwd: not a checkout, so that `python -c` imports onnxsal from ``tree`` (sys.path[0] is
    # the working folder)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=out.parent)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    res = {"tree": str(tree), "onnxsal": _which_onnxsal(tree, env, out.parent), "images": None,
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
           "seconds": round(seconds, 1), "exit": proc.returncode,
           "command": " ".join(cmd[3:])}
    if proc.returncode != 0:
        res["output"] = output[-2000:]
        return res
    summary = json.loads((out / "results.json").read_text())
    res["images"] = summary["data"]["count"]
    res["fingerprint"] = summary["data"]["fingerprint"]
    r = summary["results"][0]
    res["auc"] = {k: r[k] for k in r if k.startswith("auc")} or {
        k: v for k, v in r.items() if isinstance(v, (int, float))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--old-tree", type=Path, default=None)
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[1000, 2000])
    ap.add_argument("--method", default="original")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--fractions", default="0,0.3,0.6", help="deletion fractions (comma list)")
    ap.add_argument("--work", type=Path, default=None, help="where the images go (default: a "
                    "temporary folder, removed afterwards)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_scale")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="onnxsal-data-scale-"))
    try:
        model = work / "cnn224.onnx"
        make_model(model)
        biggest = max(a.sizes + (a.old_sizes if a.old_tree else []))
        t0 = time.time()
        full = work / f"images_{biggest}"
        files = sorted(full.glob("*/*.*"), key=lambda f: f.stem) if full.is_dir() else []
        if len(files) != biggest:  # else: made by an earlier run with --work
            shutil.rmtree(full, ignore_errors=True)
            files = make_images(full, biggest)
        gen_s = time.time() - t0
        print(f"wrote {biggest} images in {gen_s:.0f} s", flush=True)
        folders = {}
        for n in sorted(set(a.sizes + (a.old_sizes if a.old_tree else []))):
            folders[n] = full if n == biggest else work / f"images_{n}"
            if n != biggest and not folders[n].is_dir():
                link_subset(files, full, folders[n], n)
        mb = sum(f.stat().st_size for f in files) / 1e6
        report = {"command": "OMP_NUM_THREADS=1 python benchmarks/data_scale.py " + " ".join(sys.argv[1:]),
                  "image_size": SIZE, "method": a.method,
                  "metric": f"accuracy, black deletion at fractions {a.fractions}",
                  "images_written": biggest, "image_megabytes": round(mb, 1),
                  "generation_seconds": round(gen_s, 1), "machine": platform.platform(),
                  "cpus": os.cpu_count(), "shard_size": a.shard_size, "runs": []}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        todo = [("streaming", ROOT, n) for n in a.sizes] + (
            [("eager (old)", a.old_tree, n) for n in a.old_sizes] if a.old_tree else [])
        for label, tree, n in todo:
            out = work / f"out_{label[:5]}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            r = run(tree, model, folders[n], out, a.method, a.fractions, a.shard_size)
            r["loader"], r["folder_images"] = label, n
            report["runs"].append(r)
            print(json.dumps(r), flush=True)
            a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
            a.out.with_suffix(".md").write_text(markdown(report))  # after every run
        print(f"wrote {a.out.with_suffix('.md')}")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def markdown(rep: dict) -> str:
    lines = ["# Peak memory of `onnxsal benchmark` against the number of images", "",
             f"`{rep['command']}`", "",
             f"Synthetic {rep['image_size']}x{rep['image_size']} photographs (JPEG, every tenth PNG; "
             f"{rep['images_written']} images, {rep['image_megabytes']} MB on disk) in 7 class folders; "
             f"a small CNN on [N, 3, {rep['image_size']}, {rep['image_size']}]; method `{rep['method']}`, "
             f"{rep['metric']}, shard size {rep['shard_size']}, one thread, {rep['cpus']} CPUs ({rep['machine']}; "
             "shared with other jobs, so the seconds are indicative). Each run is a fresh process "
             "calling `onnxsal.benchmark.run_benchmark` (what `onnxsal benchmark` runs) on the "
             "folder; peak RSS is that process's `ru_maxrss` (`os.wait4`).", "",
             "| loader | images | peak RSS (MB) | seconds | exit |", "|---|---:|---:|---:|---:|"]
    for r in rep["runs"]:
        lines.append(f"| {r['loader']} | {r['folder_images']} | {r['peak_rss_mb']} | {r['seconds']} | "
                     f"{r['exit']} |")
    stream = [r for r in rep["runs"] if r["loader"] == "streaming" and r["exit"] == 0]
    if len(stream) >= 2:
        lo, hi = stream[0], stream[-1]
        lines += ["", f"Streaming: {hi['folder_images']} images peak at {hi['peak_rss_mb']} MB, "
                  f"{lo['folder_images']} at {lo['peak_rss_mb']} MB: ratio "
                  f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.3f}."]
    same = {r["folder_images"]: r.get("fingerprint") for r in stream}
    old = [r for r in rep["runs"] if r["loader"] != "streaming" and r["exit"] == 0]
    if len(old) >= 2:
        slope = (old[-1]["peak_rss_mb"] - old[0]["peak_rss_mb"]) / (
            old[-1]["folder_images"] - old[0]["folder_images"]) * 1000
        lines.append(f"Eager (the whole set decoded into memory, as read and conformed): "
                     f"{slope:.0f} MB more per 1,000 images (two float32 copies of 3x224x224 are "
                     "1,204 MB); 10,000 images would need about "
                     f"{(old[0]['peak_rss_mb'] + slope * (10000 - old[0]['folder_images']) / 1000) / 1000:.0f} "
                     "GB, not run on this shared machine.")
    lines.append("What the streaming peak is made of: the process's libraries and one shard's working "
                 "memory (its images, maps, and the deletion batches, at most 256 MB each), so it "
                 "follows --shard-size, not the number of images.")
    aucs = {r["folder_images"]: r.get("auc") for r in stream}
    for r in rep["runs"]:
        n = r["folder_images"]
        if r["loader"] != "streaming" and r["exit"] == 0 and n in same:
            lines.append(f"- eager and streaming on {n} images: same data fingerprint: "
                         f"{r.get('fingerprint') == same[n]}; same AUCs: {r.get('auc') == aucs[n]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
