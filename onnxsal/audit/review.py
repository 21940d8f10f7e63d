"""Expert review: the JSON file the report's buttons save, checked and folded back.

The file (written by the report's script)::

    {"format": "onnxsal-review", "version": 1, "audit": "<audit id>", "reviewer": "...",
     "verdicts": {"<image>:<method>": "agree" | "disagree", ...}}

:func:`load_review` checks it against the audit (the id, every item one of the report's maps,
every verdict agree/disagree) and raises one-line :class:`~onnxsal.errors.InputError`\\ s;
:func:`fold_review` computes the agreement rate (agree / reviewed) overall, per method and per
class (the class an image is shown under), stores ``review.json`` and rewrites ``audit.json``
and ``report.html`` with the review section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..display import printable
from ..errors import InputError
from ..files import atomic_write_json

MAX_BYTES = 16 << 20
VERDICTS = ("agree", "disagree")


def load_audit(out: str | os.PathLike) -> dict:
    path = Path(out) / "audit.json"
    if not path.is_file():
        raise InputError(f"{printable(path)}: no audit here (run onnxsal audit MODEL --data D --out "
                         f"{printable(out)} first)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{printable(path)}: not a readable audit ({' '.join(str(exc).split())})") from None


def items_of(report: dict) -> dict[str, dict]:
    """{item id: {"image", "method", "class"}} of the maps the report shows."""
    out = {}
    for it in report["samples"]["items"]:
        for m in report["samples"]["methods"]:
            out[f"{it['image']}:{m}"] = {"image": it["image"], "method": m, "class": it["class"]}
    return out


def load_review(path: str | os.PathLike, report: dict) -> dict:
    """The checked review file: {"reviewer", "verdicts": {item: verdict}}."""
    where = printable(path)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"review {where}: no such file")
    if p.stat().st_size > MAX_BYTES:
        raise InputError(f"review {where}: {p.stat().st_size} bytes, more than a review can be "
                         f"({MAX_BYTES >> 20} MB)")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"review {where}: not JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != "onnxsal-review":
        raise InputError(f"review {where}: not an onnxsal review (expected an object with "
                         "\"format\": \"onnxsal-review\", as the report's Download review button saves)")
    if data.get("version") != 1:
        raise InputError(f"review {where}: version {printable(data.get('version'))} is not supported (1 is)")
    if data.get("audit") != report["id"]:
        raise InputError(f"review {where}: made on audit {printable(data.get('audit'))}, but the report in "
                         f"this folder is audit {report['id']} (same --out, same model, data and settings?)")
    reviewer = data.get("reviewer", "")
    if reviewer is not None and not isinstance(reviewer, str):
        raise InputError(f"review {where}: \"reviewer\" must be a string")
    verdicts = data.get("verdicts")
    if not isinstance(verdicts, dict):
        raise InputError(f"review {where}: \"verdicts\" must be an object {{item: \"agree\"|\"disagree\"}}")
    known = items_of(report)
    for item, v in verdicts.items():
        if item not in known:
            raise InputError(f"review {where}: item {printable(item)[:80]} is not a map of this report")
        if v not in VERDICTS:
            raise InputError(f"review {where}: item {printable(item)[:80]}: verdict {printable(v)[:40]} "
                             "is not 'agree' or 'disagree'")
    return {"reviewer": (reviewer or "")[:200], "verdicts": dict(verdicts)}


def _rate(agree: int, disagree: int) -> dict:
    n = agree + disagree
    return {"agree": agree, "disagree": disagree, "reviewed": n,
            "agreement": agree / n if n else None}


def agreement(report: dict, verdicts: dict[str, str]) -> dict:
    """Agreement rates overall, per method (every shown method) and per class (with a review)."""
    known = items_of(report)
    counts: dict[tuple[str, str], list[int]] = {}
    for item, v in verdicts.items():
        info = known[item]
        for key in (("method", info["method"]), ("class", str(info["class"])), ("all", "")):
            c = counts.setdefault(key, [0, 0])
            c[0 if v == "agree" else 1] += 1
    per_method = {m: _rate(*counts.get(("method", m), [0, 0])) for m in report["samples"]["methods"]}
    classes = sorted({int(k[1]) for k in counts if k[0] == "class"})
    per_class = {str(c): _rate(*counts[("class", str(c))]) for c in classes}
    overall = {**_rate(*counts.get(("all", ""), [0, 0])), "items": len(known)}
    return {"overall": overall, "per_method": per_method, "per_class": per_class}


def fold_review(out: str | os.PathLike, review_file: str | os.PathLike) -> dict:
    """Check ``review_file`` against the audit in ``out``, add the agreement rates to
    ``audit.json`` and ``report.html`` (and ``review.json``); return the review section."""
    from .html import write_report
    from .summary import summarize_audit

    out = Path(out)
    report = load_audit(out)
    rv = load_review(review_file, report)
    section = {**agreement(report, rv["verdicts"]), "reviewer": rv["reviewer"],
               "verdicts": rv["verdicts"], "file": str(review_file)}
    report["review"] = section
    report["summary"] = summarize_audit(report)
    atomic_write_json(out / "review.json", {"format": "onnxsal-review", "version": 1,
                                            "audit": report["id"], "reviewer": rv["reviewer"],
                                            "verdicts": rv["verdicts"]})
    atomic_write_json(out / "audit.json", report)
    write_report(out, report)
    return section
