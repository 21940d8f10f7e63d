"""Allegiance AUCs (docs/definitions.md#deletion, the allegiance metric) from a finished accuracy run's shards.

An accuracy run of ``onnxsal benchmark`` stores, per image and per fraction deleted, the
predicted class of every deleted variant; fraction 0 is the clean image, so its prediction is
the reference of the allegiance metric. Scoring those same predictions against it gives
exactly what ``onnxsal benchmark ... --metric allegiance`` computes (same maps, same deleted
images, same model), without running the model again (about 40 minutes on a shared 2-core CPU
for the two Fashion-MNIST models). ``--check DIR`` compares with a real allegiance run of the
CLI on the first images (``--limit N``) and fails on any difference.

    python benchmarks/paper/allegiance_from_shards.py benchmarks/results/paper \
        --out benchmarks/results/paper/allegiance [--check /tmp/allegiance_500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from onnxsal.files import atomic_write_json, atomic_write_text  # noqa: E402
from onnxsal.metrics.deletion import BlackWhiteDeletion  # noqa: E402
from onnxsal.report import markdown_table  # noqa: E402


def load_parts(run: Path, model: dict, method: str) -> list[dict]:
    files = sorted((run / model["shards"]).glob(f"{method}-*.npz"))
    parts = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
    return parts


def allegiance(parts: list[dict], limit: int | None = None):
    metric = BlackWhiteDeletion("allegiance")
    out = []
    for p in parts:
        q = dict(p)
        q["reference"] = np.asarray(p["pred_black"])[:, 0].copy()  # the clean prediction
        assert (np.asarray(p["pred_white"])[:, 0] == q["reference"]).all()
        out.append(q)
    if limit is not None:
        cat = {k: np.concatenate([np.asarray(q[k]) for q in out])[:limit] for k in out[0]}
        out = [cat]
    return metric.aggregate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="folder of a finished accuracy run (results.json, shards/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", type=Path, help="folder of a CLI allegiance run on the first N images")
    a = ap.parse_args()
    acc = json.loads((a.run / "results.json").read_text())
    if acc["settings"]["metric"] != "accuracy":
        sys.exit("not an accuracy run")
    methods = acc["settings"]["methods"]
    results, rows = [], []
    for model in acc["models"]:
        for m in methods:
            res = allegiance(load_parts(a.run, model, m))
            assert len(res.errors) == model["clean"]["images"], "missing shards"
            results.append({"model": model["name"], "method": m, **res.to_dict()})
    names = [mo["name"] for mo in acc["models"]]
    for m in methods:
        row = [m]
        for n in names:
            r = next(r for r in results if r["model"] == n and r["method"] == m)
            row += [f"{r['auc']['black']:.4f}", f"{r['auc']['white']:.4f}"]
        rows.append(row)
    headers = ["method"] + [f"{n} {mode}" for n in names for mode in ("black", "white")]
    if a.check:
        chk = json.loads((a.check / "results.json").read_text())
        for r in chk["results"]:
            model = next(mo for mo in acc["models"] if mo["name"] == r["model"])
            assert model["hash"] == next(mo["hash"] for mo in chk["models"] if mo["name"] == r["model"])
            mine = allegiance(load_parts(a.run, model, r["method"]), limit=r["images"])
            for mode in ("black", "white"):
                if not np.allclose(mine.curves[mode], r["curves"][mode], atol=0, rtol=0):
                    sys.exit(f"check failed: {r['model']} {r['method']} {mode}: "
                             f"{mine.curves[mode]} != {r['curves'][mode]}")
        print(f"check: identical curves to the CLI allegiance run in {a.check} "
              f"({chk['data']['count']} images, {len(chk['results'])} model x method)")
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {"tool": "benchmarks/paper/allegiance_from_shards.py", "command": " ".join(sys.argv),
               "source_run": str(a.run), "metric": "allegiance",
               "data": acc["data"], "models": acc["models"], "results": results,
               "checked_against": str(a.check) if a.check else None}
    atomic_write_json(a.out / "results.json", summary)
    md = ["# Black- and white-deletion, allegiance metric\n",
          f"Agreement with the clean image's prediction, from the per-image predictions of the "
          f"accuracy run in `{a.run}` ({acc['data']['count']} images). Lower is better; lowest "
          "per column in bold.\n",
          markdown_table(headers, _bold(rows), "l" + "r" * (len(headers) - 1)),
          "\nCurves (allegiance at each fraction deleted):\n",
          markdown_table(["model", "method", "mode"] + [f"{p:g}" for p in acc["settings"]["fractions"]],
                         [[r["model"], r["method"], mode] + [f"{v:.3f}" for v in r["curves"][mode]]
                          for r in results for mode in ("black", "white")], "lll" + "r" * 10)]
    atomic_write_text(a.out / "results.md", "\n".join(md) + "\n")
    print("\n".join(md[:3]))


def _bold(rows: list[list[str]]) -> list[list[str]]:
    for j in range(1, len(rows[0])):
        best = min(float(r[j]) for r in rows)
        for r in rows:
            if float(r[j]) == best:
                r[j] = f"**{r[j]}**"
    return rows


if __name__ == "__main__":
    main()
