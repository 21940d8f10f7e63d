"""The result files of ``onnxsal evaluate`` (scores.json, scores.md, plots/*.png) and the
bootstrap confidence interval of each mean (:func:`bootstrap_ci`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..benchmark import _safe
from ..display import printable
from ..report import atomic_write_json, atomic_write_text, fmt, markdown_table

ARROW = {"lower": "\u2193", "higher": "\u2191"}


# --------------------------------------------------------------------------------------------
# confidence intervals


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                 seed: Any = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean of the finite ``values`` (resampling
    images; ``scipy.stats.bootstrap``), or None with fewer than 2 values or no resamples."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if resamples < 1 or len(v) < 2:
        return None
    if np.ptp(v) == 0:  # every resample has this mean (as the mean itself is computed)
        return [float(v.mean()), float(v.mean())]
    from scipy.stats import bootstrap

    res = bootstrap((v,), np.mean, n_resamples=int(resamples), confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed),
                    batch=max(1, (1 << 22) // len(v)))
    ci = res.confidence_interval
    return [float(ci.low), float(ci.high)]


# --------------------------------------------------------------------------------------------
# result files


def scores_table(summary: dict) -> str:
    """Method rows, one column per score ("mean [lo, hi]", the best mean in bold, the
    direction arrow in the header); '' when no metric applied."""
    cols = list(summary["scores"])
    if not cols:
        return ""
    meths = summary["settings"]["methods"]
    best = {}
    for c in cols:
        sc = summary["scores"][c]
        vals = [e["mean"] for e in sc["methods"].values() if e["mean"] is not None]
        best[c] = (min if sc["direction"] == "lower" else max)(vals) if vals else None
    rows = []
    for m in meths:
        row = [m]
        for c in cols:
            e = summary["scores"][c]["methods"].get(m)
            if e is None:
                row.append("-")
                continue
            cell = fmt(e["mean"])
            if e["mean"] is not None and e["mean"] == best[c] and len(meths) > 1:
                cell = f"**{cell}**"
            if e["ci"] is not None:
                cell += f" [{fmt(e['ci'][0])}, {fmt(e['ci'][1])}]"
            row.append(cell)
        rows.append(row)
    return markdown_table(["method"] + [f"{c} {ARROW[summary['scores'][c]['direction']]}"
                                        for c in cols], rows)


def scores_markdown(summary: dict) -> str:
    """scores.md: what was scored, :func:`scores_table`, then what was skipped and why."""
    b = summary["settings"]["bootstrap"]
    d = summary["data"]
    src = summary["settings"]["maps"]
    src = "onnxsal" if src["source"] == "onnxsal" else f"`{src['file']}`"
    lines = ["# onnxsal evaluate", "",
             f"Model `{summary['model']['path'] or 'model'}` (sha256 {summary['model']['hash'][:12]}), "
             f"{d['count']} images of {d['source']}; maps from {src}.", "",
             f"Cells: mean over images [{b['confidence']:.0%} percentile bootstrap interval, "
             f"{b['resamples']} resamples of the images]; arrows: which direction is better; "
             "bold: the best method.", "",
             scores_table(summary) or "No metric applied.\n"]
    if summary["skipped"]:
        lines.append("Skipped:\n")
        lines += [f"- {s['metric']}: {s['reason']}" for s in summary["skipped"]]
        lines.append("")
    return "\n".join(lines)


def plot_scores(summary: dict, column: str, path: str | os.PathLike) -> None:
    """One bar per method: the mean, the confidence interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..files import atomic_write_bytes
    from ..overlays import png_bytes

    sc = summary["scores"][column]
    meths = list(sc["methods"])
    mean = np.array([np.nan if sc["methods"][m]["mean"] is None else sc["methods"][m]["mean"]
                     for m in meths])
    ci = [sc["methods"][m]["ci"] for m in meths]
    lo = np.array([mean[i] - c[0] if c else 0.0 for i, c in enumerate(ci)])
    hi = np.array([c[1] - mean[i] if c else 0.0 for i, c in enumerate(ci)])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(meths) + 2), 3.6))
    ax.bar(range(len(meths)), np.nan_to_num(mean), yerr=np.vstack([lo, hi]), capsize=4,
           color="#4c72b0")
    ax.set_xticks(range(len(meths)), [printable(m) for m in meths], rotation=30, ha="right")
    better = "lower" if sc["direction"] == "lower" else "higher"
    ax.set_title(f"{column} ({better} is better)")
    ax.set_ylabel(f"mean, {summary['settings']['bootstrap']['confidence']:.0%} CI")
    ax.grid(axis="y", alpha=0.3)
    atomic_write_bytes(path, png_bytes(fig, dpi=100, metadata={"Software": None}))


def write_outputs(out: Path, summary: dict) -> None:
    """scores.json, scores.md, then one plot per score column (a failed plot is listed in
    scores.json, never costs the scores)."""
    from ..overlays import draw_figures

    atomic_write_json(out / "scores.json", summary)
    atomic_write_text(out / "scores.md", scores_markdown(summary))
    figs = [(f"plots/{_safe(c)}.png",
             lambda c=c: plot_scores(summary, c, out / "plots" / f"{_safe(c)}.png"))
            for c in summary["scores"]]
    failed = draw_figures(figs)
    if failed:
        summary["figure_failures"] = [{"name": n, "error": e} for n, e in failed]
        atomic_write_json(out / "scores.json", summary)
