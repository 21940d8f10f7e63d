"""The verdict, Markdown and figures of the model-parameter randomisation test
(:mod:`onnxsal.sanity_run` computes the steps; docs/definitions.md#sanity-checks).

Pass/fail rule (:data:`RULE`): lower similarity to the trained model's maps is better
(:data:`DIRECTION`); see :func:`verdict`. The per-step rule (:data:`STEP_RULE`,
:func:`step_verdicts`) asks, step by step, whether the similarity fell significantly, and
passes a method only when it falls as soon as the top layer is randomised.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .display import printable
from .metrics import similarity as sim
from .metrics.randomisation import pick_steps
from .report import atomic_write_bytes

METRIC_LABELS = {"spearman_abs": "Spearman (absolute maps)",
                 "spearman_signed": "Spearman (signed maps)",
                 "ssim": "SSIM", "hog": "HOG similarity"}
DIRECTION = "lower"  # lower similarity to the trained model's maps = more model-dependent
RULE = ("a method passes when its mean Spearman rank correlation of the absolute maps "
        "(spearman_abs) at the end of the test (cascading: all layers randomised; independent: "
        "the layer whose randomisation lowers it most) is below {threshold} and at least "
        "{margin} below its trained-model self-similarity (step 0); otherwise it fails")


STEP_RULE = ("at a step the similarity has dropped when the mean spearman_abs over images is at "
             "least {step_margin} below the step-0 self-similarity and a one-sided Wilcoxon "
             "signed-rank test over images (per-image self-similarity minus similarity > 0) "
             "gives p < {alpha}; the top-layer verdict passes a method when the similarity "
             "dropped at each of the first {top_steps} step(s) (cascading: the top layer(s) "
             "randomised; independent: each of them alone), so that a method whose maps ignore "
             "the top layers fails it")


def step_drop(base: np.ndarray, values: np.ndarray, step_margin: float, alpha: float) -> dict:
    """Whether one step's per-image similarities fell below the per-image self-similarities
    ``base`` (step 0): mean drop >= step_margin and one-sided Wilcoxon p < alpha."""
    from scipy import stats

    b = np.asarray(base, np.float64)
    v = np.asarray(values, np.float64)
    ok = np.isfinite(b) & np.isfinite(v)
    if not ok.any():
        return {"drop": None, "p_value": None, "n": 0, "dropped": None}
    d = b[ok] - v[ok]
    if np.all(d == 0):
        p = 1.0
    else:
        p = float(stats.wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)
    drop = float(d.mean())
    return {"drop": drop, "p_value": p, "n": int(ok.sum()),
            "dropped": bool(drop >= step_margin and p < alpha)}


def step_verdicts(base: np.ndarray, steps: list[tuple[int, str, np.ndarray]], step_margin: float,
                  alpha: float, top_steps: int) -> dict:
    """:data:`STEP_RULE` for one method: ``base`` its per-image step-0 self-similarities,
    ``steps`` (step index, label, per-image spearman_abs) of the randomised steps in order."""
    per = [{"step": i, "label": label, **step_drop(base, v, step_margin, alpha)}
           for i, label, v in steps]
    top = per[:max(1, int(top_steps))]
    if not top or any(s["dropped"] is None for s in top):
        return {"passes": None, "steps": per, "first_drop": None,
                "reason": "no finite similarity at the top step(s)"}
    first = next((s["step"] for s in per if s["dropped"]), None)
    passes = all(s["dropped"] for s in top)
    if passes:
        reason = (f"drops by {top[-1]['drop']:.3f} (p={top[-1]['p_value']:.2g}) once "
                  f"`{top[-1]['label']}` is randomised")
    else:
        miss = next(s for s in top if not s["dropped"])
        reason = (f"drops by only {miss['drop']:.3f} (p={miss['p_value']:.2g}) when "
                  f"`{miss['label']}` is randomised; first significant drop at "
                  f"{'step ' + str(first) if first is not None else 'no step'}")
    return {"passes": passes, "steps": per, "first_drop": first, "reason": reason}


def verdict(steps: list[dict], method: str, mode: str, threshold: float, margin: float) -> dict:
    """Apply :data:`RULE` to one method's per-step summaries (step 0 first)."""
    base = steps[0]["methods"][method]["spearman_abs"]["mean"]
    later = [s["methods"][method]["spearman_abs"]["mean"] for s in steps[1:]]
    later = [v for v in later if v is not None]
    if base is None or not later:
        return {"passes": None, "baseline": base, "final": None, "reason": "no finite similarity"}
    final = later[-1] if mode == "cascading" else min(later)
    passes = bool(final < threshold and base - final >= margin)
    if passes:
        reason = f"similarity falls from {base:.3f} to {final:.3f}"
    elif final >= threshold:
        reason = f"similarity stays at {final:.3f} (>= {threshold}) after randomisation"
    else:
        reason = f"similarity {final:.3f} is within {margin} of the self-similarity {base:.3f}"
    return {"passes": passes, "baseline": base, "final": final, "reason": reason}


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _p(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v >= 1e-3 else f"{v:.0e}")


def markdown(report: dict) -> str:
    """sanity.md: verdicts, then per metric a table of mean (std) per step and method."""
    from .report import markdown_table

    methods = report["methods"]
    lines = [f"# Sanity check ({report['mode']} model-parameter randomisation)", "",
             f"- model: `{report['model']}` (sha256 {report['model_hash'][:12]})",
             f"- images: {report['images']}; seed {report['seed']}; "
             f"{len(report['layers'])} learnable layers; {len(report['steps']) - 1} steps",
             f"- similarity of each randomised model's maps to the trained model's maps "
             f"(lower = the map depends more on the learned weights); HOG correlation: "
             f"{report['hog_correlation']}",
             f"- rule: {report['rule']}", ""]
    lines.append("## Verdicts\n")
    rows = []
    words = {True: "**pass**", False: "**fail**", None: "undecided"}
    for m in methods:
        v = report["verdicts"][m]
        rows.append([m, words[v["passes"]], _f(v["baseline"]), _f(v["final"]), v["reason"]])
    lines.append(markdown_table(["method", "verdict", "self-similarity (step 0)",
                                 "final spearman_abs", "why"], rows, "llrrl"))
    if report.get("step_verdicts"):
        lines += ["## Per-step verdicts\n", f"Rule: {report['step_rule']}.\n"]
        sv = report["step_verdicts"]
        lines.append(markdown_table(["method", "top-layer verdict", "first significant drop", "why"],
                                    [[m, words[sv[m]["passes"]], _f(sv[m]["first_drop"], 0)
                                      if sv[m]["first_drop"] is not None else "none", sv[m]["reason"]]
                                     for m in methods], "llrl"))
        rows = []
        for k, s in enumerate(report["steps"][1:]):
            row = [s["step"], f"`{s['label']}`"]
            for m in methods:
                d = sv[m]["steps"][k]
                mark = {True: "yes", False: "no", None: "n/a"}[d["dropped"]]
                row.append(f"{_f(d['drop'])} (p={_p(d['p_value'])}) {mark}")
            rows.append(row)
        lines.append("Drop of the mean spearman_abs below the self-similarity (Wilcoxon p), "
                     "and whether it counts as a significant drop:\n")
        lines.append(markdown_table(["step", "layer"] + list(methods), rows, "rl" + "r" * len(methods)))
    for metric in sim.METRICS:
        lines.append(f"## {METRIC_LABELS[metric]}: mean (std) over images\n")
        rows = []
        for s in report["steps"]:
            row = [s["step"], f"`{s['label']}`", s["layers_randomised"], _f(s["class_agreement"], 2)]
            for m in methods:
                d = s["methods"][m][metric]
                cell = f"{_f(d['mean'])} ({_f(d['std'])})"
                if d["n_nan"]:
                    cell += f" [{d['n_nan']} NaN]"
                row.append(cell)
            rows.append(row)
        lines.append(markdown_table(["step", "layer", "randomised", "same class"] + list(methods),
                                    rows, "rlrr" + "r" * len(methods)))
    lines.append("\"same class\": fraction of images whose predicted class is unchanged (the "
                 "explained class is re-predicted on every randomised model).\n")
    return "\n".join(lines)


def save_fig(fig, path: Path) -> None:
    from .overlays import png_bytes

    atomic_write_bytes(path, png_bytes(fig, layout=False, dpi=110, bbox_inches="tight"))


def plot_curves(report: dict, path: str | os.PathLike) -> None:
    """Similarity against the randomisation step; one line per method, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    xs = np.array([s["step"] for s in steps])  # cascading: number of layers randomised
    labels = [printable(s["label"] if len(s["label"]) <= 24 else "..." + s["label"][-21:])
              for s in steps]
    fig, axes = plt.subplots(1, len(sim.METRICS), figsize=(4.2 * len(sim.METRICS), 4.2), sharey=True)
    for ax, metric in zip(axes, sim.METRICS):
        for m in report["methods"]:
            mean = np.array([np.nan if s["methods"][m][metric]["mean"] is None
                             else s["methods"][m][metric]["mean"] for s in steps])
            std = np.array([np.nan if s["methods"][m][metric]["std"] is None
                            else s["methods"][m][metric]["std"] for s in steps])
            line, = ax.plot(xs, mean, marker="o", ms=3, label=m)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        ax.set_title(METRIC_LABELS[metric])
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        every = max(1, len(xs) // 14)
        ax.set_xticks(xs[::every])
        ax.set_xticklabels(labels[::every], rotation=70, ha="right", fontsize=7)
        ax.set_xlabel("cascading: randomised down to layer" if report["mode"] == "cascading"
                      else "independently randomised layer")
    axes[0].set_ylabel("similarity to the trained model's map")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{report['mode']} randomisation, {report['images']} images "
                 f"(mean and std over images)", fontsize=10)
    save_fig(fig, Path(path))


def plot_grid(report: dict, image: np.ndarray, original: dict[str, np.ndarray],
              grids: dict[int, dict[str, np.ndarray]], path: str | os.PathLike,
              index: int = 0, max_columns: int = 10) -> None:
    """Rows methods, columns: the image, the trained model's map, then the steps (at most
    ``max_columns`` spread evenly, the last always shown); maps absolute-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"][1:]
    cols = [steps[i] for i in pick_steps(len(steps), max_columns)] if steps else []
    methods = report["methods"]
    n_cols = 2 + len(cols)
    fig, axes = plt.subplots(len(methods), n_cols, figsize=(1.5 * n_cols, 1.6 * len(methods) + 0.4),
                             squeeze=False)
    img = np.asarray(image, np.float32)
    show = img[0] if img.shape[0] == 1 else np.clip(img.transpose(1, 2, 0), 0, 1)
    for r, m in enumerate(methods):
        cells = [("image", None), ("trained", original[m][index])] + \
                [(s["label"], grids[s["step"]][m]) for s in cols]
        for c, (title, arr) in enumerate(cells):
            ax = axes[r, c]
            if arr is None:
                ax.imshow(show, cmap="gray" if show.ndim == 2 else None, vmin=0, vmax=1)
            else:
                ax.imshow(sim.normalize_abs(arr), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                t = title if len(title) <= 16 else "..." + title[-13:]
                ax.set_title(t, fontsize=6, rotation=30 if c > 1 else 0)
            if c == 0:
                ax.set_ylabel(m, fontsize=7)
    fig.suptitle(f"image {index}: maps as layers are randomised ({report['mode']})", fontsize=9)
    save_fig(fig, Path(path))
