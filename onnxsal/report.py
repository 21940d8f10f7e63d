"""Tables (Markdown, CSV, JSON) and curve plots, written atomically.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written result. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from .display import printable
from .errors import OutputError, first_line
from .files import (  # noqa: F401 (re-exported)
    atomic_savez,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,  # noqa: F401
    atomic_write_text,
    to_json,
)

# --------------------------------------------------------------------------------------------
# atomic writes (onnxsal/files.py) and the output-folder check


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output folder that cannot take results, before any work: a file in the way,
    a folder under a file, a read-only or full file system (a probe file is written in the
    folder, or in its nearest existing parent, which stays as it was) is one
    :class:`OutputError` instead of a loss after the work is done."""
    path = Path(path)
    where = printable(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {where} is a file")
    up = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not up.is_dir():
        raise OutputError(f"output folder {where} is under {printable(up)}, which is a file")
    try:
        with tempfile.TemporaryFile(dir=up) as f:
            f.write(b"onnxsal write probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"output folder {where} is not writable"
                          + (f" ({printable(up)})" if up != path else "")
                          + f": {exc.strerror or first_line(exc)}") from None
    return path


# --------------------------------------------------------------------------------------------
# tables


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one of 'l', 'r', 'c' per column."""
    headers = [str(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join(sep[a] for a in align) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(printable(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# the deletion benchmark's outputs


def deletion_table(results: dict) -> str:
    """The paper-shaped table: rows methods, columns model x black/white AUC (lowest bold)."""
    models = [m["name"] for m in results["models"]]
    methods = results["settings"]["methods"]
    modes = results["settings"].get("modes", ["black", "white"])
    by = {(r["model"], r["method"]): r for r in results["results"]}
    headers = ["method"] + [f"{m} {mode}" for m in models for mode in modes]
    best = {}
    for m in models:
        for mode in modes:
            vals = [by[(m, meth)]["auc"][mode] for meth in methods if (m, meth) in by]
            vals = [v for v in vals if not math.isnan(v)]
            best[(m, mode)] = min(vals) if vals else None
    rows = []
    for meth in methods:
        row = [meth]
        for m in models:
            for mode in modes:
                r = by.get((m, meth))
                if r is None:
                    row.append("-")
                    continue
                v = r["auc"][mode]
                s = fmt(v)
                if best[(m, mode)] is not None and v == best[(m, mode)]:
                    s = f"**{s}**"
                row.append(s)
        rows.append(row)
    return markdown_table(headers, rows)


def rise_table(results: dict) -> str:
    """Rows methods; columns model x RISE deletion (lowest bold) / insertion (highest bold)."""
    models = [m["name"] for m in results["models"]]
    methods = results["settings"]["methods"]
    kinds = ("deletion", "insertion")
    by = {(r["model"], r["method"]): r.get("rise") for r in results["results"]}
    best = {}
    for m in models:
        for k in kinds:
            vals = [by[(m, meth)][k]["auc"] for meth in methods if by.get((m, meth))]
            vals = [v for v in vals if not math.isnan(v)]
            best[(m, k)] = (min if k == "deletion" else max)(vals) if vals else None
    rows = []
    for meth in methods:
        row = [meth]
        for m in models:
            for k in kinds:
                r = by.get((m, meth))
                if not r:
                    row.append("-")
                    continue
                v = r[k]["auc"]
                row.append(f"**{fmt(v)}**" if v == best[(m, k)] else fmt(v))
        rows.append(row)
    return markdown_table(["method"] + [f"{m} {k}" for m in models for k in kinds], rows)


def metrics_table(results: dict) -> str:
    """The other registered metrics (``results[...]["metrics"]``): rows methods, columns
    model x metric value, the best per column (by the metric's direction) in bold; '' when
    there are none."""
    models = [m["name"] for m in results["models"]]
    methods = results["settings"]["methods"]
    by = {(r["model"], r["method"]): r.get("metrics") or {} for r in results["results"]}
    names = list(dict.fromkeys(k for v in by.values() for k in v))
    if not names:
        return ""
    best = {}
    for m in models:
        for k in names:
            got = [by[(m, meth)][k] for meth in methods if k in by.get((m, meth), {})]
            vals = [g["value"] for g in got if not math.isnan(g["value"])]
            best[(m, k)] = ((min if got[0]["direction"] == "lower" else max)(vals)
                            if vals else None)
    rows = []
    for meth in methods:
        row = [meth]
        for m in models:
            for k in names:
                r = by.get((m, meth), {}).get(k)
                if r is None:
                    row.append("-")
                    continue
                row.append(f"**{fmt(r['value'])}**" if r["value"] == best[(m, k)]
                           else fmt(r["value"]))
        rows.append(row)
    return markdown_table(["method"] + [f"{m} {k}" for m in models for k in names], rows)


def deletion_markdown(results: dict) -> str:
    """results.md: the AUC table, clean scores, settings, notes and failures."""
    s = results["settings"]
    d = results["data"]
    metric = s["metric"]
    out = ["# Black- and white-deletion benchmark", ""]
    out.append(f"Data: {d['source']}, {d['count']} images of shape "
               f"{'x'.join(map(str, d['shape']))} (fingerprint `{d['fingerprint'][:16]}`). "
               f"Metric: top-1 {metric} "
               + ("against the true labels." if metric == "accuracy" else
                  "(agreement with the clean image's prediction).")
               + f" Fractions deleted: {', '.join(f'{p:g}' for p in s['fractions'])}. "
               f"AUC: trapezoid rule, dx = 0.1, not normalised (maximum 0.9 x the clean "
               f"score). Lower black-deletion AUC: the map finds the pixels that support the "
               f"class; lower white-deletion AUC: the pixels that oppose it. Lowest per column "
               f"in bold.")
    out.append("")
    out.append(deletion_table(results))
    rs = s.get("rise")
    if rs:
        out.append(f"RISE deletion (baseline {rs['baseline']}; lower is better) and insertion "
                   f"(from a blurred image; higher is better): softmax probability of the clean "
                   f"prediction, {rs['step']} pixels per step, AUC over [0, 1].")
        out.append("")
        out.append(rise_table(results))
    extra = metrics_table(results)
    if extra:
        out.append("Other metrics (" + "; ".join(
            f"{k}: {v['direction']} is better"
            for k, v in results["results"][0].get("metrics", {}).items()) + "):")
        out.append("")
        out.append(extra)
    rows = []
    for m in results["models"]:
        rows.append([m["name"], f"`{m['hash'][:16]}`", "x".join(map(str, m["input_shape"])),
                     m["num_classes"], fmt(m["clean"]["score"]), m["clean"]["images"]])
    out.append(f"Models (clean {metric} on the images used):")
    out.append("")
    out.append(markdown_table(["model", "content hash", "input", "classes",
                               f"clean {metric}", "images"], rows))
    out.append("Curves (" + metric + " at each fraction deleted):")
    out.append("")
    frs = s["fractions"]
    rows = []
    for r in results["results"]:
        for mode, curve in r["curves"].items():
            rows.append([r["model"], r["method"], mode] + [fmt(v, 3) for v in curve])
    out.append(markdown_table(["model", "method", "mode"] + [f"{p:g}" for p in frs], rows,
                              "lll" + "r" * len(frs)))
    notes = list(d.get("notes", []))
    if notes:
        out.append("Data notes: " + "; ".join(notes) + ".")
        out.append("")
    fails = [(f["name"], f["error"]) for f in d.get("failures", [])]
    img_fails = [(r["model"], r["method"], f["name"], f["error"])
                 for r in results["results"] for f in r.get("failures", [])]
    img_fails += [(r["model"], r["method"], f["name"], f"{k}: {f['error']}")
                  for r in results["results"] for k, v in (r.get("metrics") or {}).items()
                  for f in v.get("failures", [])]
    if fails or img_fails:
        out.append("## Failures")
        out.append("")
        for n, e in fails:
            out.append(f"- data: {n}: {e}")
        for m, meth, n, e in img_fails[:200]:
            out.append(f"- {m} / {meth}: {n}: {e}")
        if len(img_fails) > 200:
            out.append(f"- ... {len(img_fails) - 200} more in results.json")
        out.append("")
    out.append(f"Settings: seed {s['seed']}, limit {s['limit']}, preprocess "
               f"{s['preprocess'] or 'from the model'}, shard size {s['shard_size']}. "
               "Everything else is in results.json.")
    return "\n".join(out) + "\n"


def deletion_csv_rows(results: dict) -> tuple[list[str], list[list[Any]]]:
    headers = ["model", "model_hash", "method", "mode", "fraction", "value", "metric",
               "valid_images"]
    hashes = {m["name"]: m["hash"] for m in results["models"]}
    rows = []
    for r in results["results"]:
        for mode, curve in r["curves"].items():
            for p, v in zip(r["fractions"], curve):
                rows.append([r["model"], hashes[r["model"]], r["method"], mode, f"{p:g}",
                             repr(float(v)), results["settings"]["metric"], r["valid_images"]])
        for kind, rr in (r.get("rise") or {}).items():
            for p, v in zip(rr["x"], rr["curve"]):
                rows.append([r["model"], hashes[r["model"]], r["method"], f"rise-{kind}",
                             f"{p:.6g}", repr(float(v)), "probability", rr["valid_images"]])
    return headers, rows


def plot_deletion_curves(results: dict, path: str | os.PathLike) -> None:
    """curves.png: metric against fraction deleted, one line per method; black | white."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = [m["name"] for m in results["models"]]
    modes = list(results["settings"].get("modes", ["black", "white"]))
    if results["settings"].get("rise"):
        modes += ["rise-deletion", "rise-insertion"]
    metric = results["settings"]["metric"]
    fig, axes = plt.subplots(len(models), len(modes), figsize=(5.2 * len(modes), 3.8 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            rise = mode.startswith("rise-")
            for r in results["results"]:
                if r["model"] != m:
                    continue
                if rise:
                    rr = r["rise"][mode[5:]]
                    ax.plot(rr["x"], rr["curve"], label=f"{r['method']} ({fmt(rr['auc'])})")
                else:
                    ax.plot(r["fractions"], r["curves"][mode], marker="o", markersize=3,
                            label=f"{r['method']} ({fmt(r['auc'][mode])})")
            ax.set_title(f"{m}: RISE {mode[5:]}" if rise else f"{m}: {mode} deletion")
            ax.set_xlabel("fraction of pixels " + ("inserted" if mode == "rise-insertion"
                                                   else "deleted"))
            if j == 0:
                ax.set_ylabel(metric)
            elif rise:
                ax.set_ylabel("probability of the clean class")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="method (AUC)", title_fontsize=8)
    from .overlays import png_bytes

    atomic_write_bytes(path, png_bytes(fig, dpi=110, metadata={"Software": None}))
