"""The report's summary: verdicts in plain words and the top findings, from the audit's numbers.

Each verdict is ``{"topic", "level", "text"}``; ``level`` is ``good`` (nothing to worry
about), ``warn`` (look at the section), ``bad`` (a problem was found) or ``info``.
"""

from __future__ import annotations

import math


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def accuracy_verdict(a: dict, names: list[str]) -> dict:
    if not a.get("labels"):
        return {"topic": "accuracy", "level": "info",
                "text": f"The data has no labels: accuracy is unknown; the {a['images']} images are "
                        "grouped by the model's predictions."}
    text = (f"The model is right on {_pct(a['accuracy'])} of the {a['images']} labelled images "
            f"({a['correct']} of {a['images']}).")
    per = [p for p in a["per_class"] if p["accuracy"] is not None]
    if per:
        worst = min(per, key=lambda p: (p["accuracy"], p["class"]))
        text += f" Weakest class: {worst['name']} ({_pct(worst['accuracy'])} of {worst['images']})."
    if a.get("top_confusions"):
        t = a["top_confusions"][0]
        text += (f" Most frequent confusion: {names[t['true']]} taken for {names[t['predicted']]} "
                 f"({t['images']} images).")
    level = "good" if a["accuracy"] >= 0.9 else ("warn" if a["accuracy"] >= 0.6 else "bad")
    return {"topic": "accuracy", "level": level, "text": text}


def sanity_verdict(s: dict) -> dict:
    passed = [m for m, v in s["verdicts"].items() if v["passes"] is True]
    failed = [m for m, v in s["verdicts"].items() if v["passes"] is False]
    undecided = [m for m, v in s["verdicts"].items() if v["passes"] is None]
    parts = []
    if passed:
        parts.append(f"the maps of {', '.join(passed)} change when the model's weights are randomised "
                     "(they depend on what the model learned)")
    if failed:
        parts.append(f"the maps of {', '.join(failed)} stay similar after randomisation: they do not "
                     "show what the model learned and should not be trusted as explanations")
    if undecided:
        parts.append(f"{', '.join(undecided)}: undecided (no finite similarity)")
    # the per-step rule: a method whose maps do not change when the top layer is randomised
    # ignores what the model decides there (guided backprop), even if it passes at the end
    top_failed = [m for m, v in (s.get("step_verdicts") or {}).items() if v.get("passes") is False]
    if top_failed:
        parts.append(f"the maps of {', '.join(top_failed)} do not change significantly when only the "
                     "top layer is randomised (the top-layer rule): they may ignore what the model's "
                     "last layers decide")
    text = "Sanity checks: " + "; ".join(parts) + "."
    return {"topic": "sanity", "level": "bad" if failed or top_failed else "good", "text": text}


def deletion_verdict(b: dict) -> dict:
    rows = [r for r in b["rows"] if _finite(r["auc"].get("black"))]
    if not rows:
        return {"topic": "faithfulness", "level": "warn", "text": "Deletion gave no finite result."}
    best = min(rows, key=lambda r: r["auc"]["black"])
    worst = max(rows, key=lambda r: r["auc"]["black"])
    what = "accuracy" if b["metric"] == "accuracy" else "agreement with the clean prediction"
    if len(rows) == 1:
        text = (f"Faithfulness: blacking out the pixels that {best['method']} ranks highest gives a "
                f"black-deletion AUC of {best['auc']['black']:.3f} for the {what} (lower is better: the "
                f"curve falls sooner), on {b['images']} images.")
        return {"topic": "faithfulness", "level": "info", "text": text}
    text = (f"Faithfulness: blacking out the pixels that {best['method']} ranks highest lowers the "
            f"{what} fastest (black-deletion AUC {best['auc']['black']:.3f}, lower is better); "
            f"{worst['method']} is the least faithful by this test ({worst['auc']['black']:.3f}), "
            f"on {b['images']} images.")
    return {"topic": "faithfulness", "level": "info", "text": text}


def shortcut_verdict(s: dict, names: list[str]) -> dict:
    if not s.get("available"):
        return {"topic": "shortcuts", "level": "info", "text": f"Shortcut search: {s.get('reason')}."}
    sus = sorted((f for f in s["findings"] if f["suspected"]), key=lambda f: -(f.get("paste_excess") or 0))
    tested = len(s["findings"])
    if not sus:
        return {"topic": "shortcuts", "level": "good",
                "text": f"No suspected shortcut: in none of the {tested} classes tested does pasting the "
                        "region where its saliency concentrates turn other images into that class "
                        "much more often than pasting a random region of the same size."}
    f = sus[0]
    y0, x0, y1, x1 = f["box"]
    text = (f"Suspected shortcut: class {names[f['class']]} - pasting the region rows {y0}-{y1 - 1}, "
            f"columns {x0}-{x1 - 1} onto images of other classes makes the model predict "
            f"{names[f['class']]} in {_pct(f['paste_flip_rate'])} of {f['paste_pairs']} cases "
            f"(a random region of the same size: {_pct(f['control_flip_rate'])}).")
    if len(sus) > 1:
        text += f" {len(sus) - 1} more class(es) suspected: see the shortcut section."
    return {"topic": "shortcuts", "level": "bad", "text": text}


def localisation_verdict(loc: dict) -> dict | None:
    if not loc.get("given"):
        return None
    pg = loc["metrics"].get("pointing-game")
    if pg:
        vals = {m: v["value"] for m, v in pg["methods"].items() if _finite(v["value"])}
        if vals:
            best = max(vals, key=vals.get)
            return {"topic": "localisation", "level": "info",
                    "text": f"Localisation: the most salient pixel of {best} lies inside the ground-truth "
                            f"mask in {_pct(vals[best])} of the images (pointing game; the best method)."}
    return {"topic": "localisation", "level": "info",
            "text": f"Localisation scores against the masks on {loc['images']} images: see the section."}


def review_verdict(review: dict | None) -> dict | None:
    if not review:
        return None
    o = review["overall"]
    if not o["reviewed"]:
        return None
    return {"topic": "review", "level": "good" if o["agreement"] >= 0.7 else "warn",
            "text": f"Expert review: the reviewer agreed with {_pct(o['agreement'])} of the "
                    f"{o['reviewed']} maps reviewed."}


def summarize_audit(report: dict) -> dict:
    """{"verdicts": [...], "findings": [...]} (findings: the few most important lines)."""
    names = report["model"]["class_names"]

    def guarded(key: str, topic: str, fn):
        if "error" in report[key]:
            return {"topic": topic, "level": "warn", "text": f"{topic.capitalize()}: not run "
                    f"({report[key]['error']})."}
        return fn(report[key])

    verdicts = [accuracy_verdict(report["predictions"], names),
                guarded("shortcuts", "shortcuts", lambda s: shortcut_verdict(s, names)),
                guarded("sanity", "sanity", sanity_verdict),
                guarded("benchmark", "faithfulness", deletion_verdict)]
    loc = guarded("localisation", "localisation", localisation_verdict)
    for v in (loc, review_verdict(report.get("review"))):
        if v is not None:
            verdicts.append(v)
    if report["model"]["gradient_source"]:
        verdicts.append({"topic": "gradients", "level": "info",
                         "text": f"Gradients: {report['model']['gradient_source']}."})
    order = {"bad": 0, "warn": 1, "good": 2, "info": 3}
    findings = [v["text"] for v in sorted(verdicts, key=lambda v: order[v["level"]])
                if v["level"] in ("bad", "warn")][:5]
    return {"verdicts": verdicts, "findings": findings}
