"""The audit report on the planted-tag demonstration: ``onnxsal audit`` on the Fashion-MNIST CNN
trained with a tag on class 2 (Pullover) and on the one trained without it, both on the same
images (90% of class 2's images carry the tag; tests/data/fmnist_tag_sample.npz, made by
benchmarks/shortcut_demo.py --bundle).

Writes ``benchmarks/results/audit/report_tagged/`` and ``report_clean/`` (report.html,
audit.json, the benchmark's results.md, the sanity check's sanity.md; the resumable parts and
shards stay in ``--work``) and ``benchmarks/results/audit/audit_reports.md`` (what each report
found, the command, the seconds).

    OMP_NUM_THREADS=1 python benchmarks/audit_demo.py [--work out/audit_demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "audit"
DATA = "tests/data/fmnist_tag_sample.npz"
MODELS = {"tagged": "tests/data/fmnist_tagged_cnn.onnx", "clean": "tests/data/fmnist_clean_cnn.onnx"}
KEEP = ["report.html", "audit.json", "benchmark/results.md", "sanity/sanity.md"]


def run(kind: str, work: Path) -> dict:
    from onnxsal.audit import run_audit

    out = work / kind
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    command = f"onnxsal audit {MODELS[kind]} --data {DATA} --out {shown} --threads 1"
    t = time.time()
    rep = run_audit(MODELS[kind], DATA, out, threads=1, command=command,
                    progress=lambda s: print(f"[{kind}] {s}", file=sys.stderr))
    dest = RESULTS / f"report_{kind}"
    for rel in KEEP:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / rel, dest / rel)
    return {"kind": kind, "command": command, "seconds": round(time.time() - t, 1), "report": rep}


def _r(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def describe(r: dict) -> list[str]:
    rep = r["report"]
    sc = rep["shortcuts"]
    names = rep["model"]["class_names"]
    lines = [f"### {r['kind']} model (`{MODELS[r['kind']]}`)", "",
             f"`{r['command']}` ({r['seconds']} s; [report](report_{r['kind']}/report.html), "
             f"[audit.json](report_{r['kind']}/audit.json))", ""]
    lines += [f"- **{v['level']}** {v['topic']}: {v['text']}" for v in rep["summary"]["verdicts"]]
    if sc.get("available"):
        lines += ["", "| class | box | paste flip | control | blank flip | control | suspected |",
                  "|---|---|---|---|---|---|---|"]
        for f in sc["findings"]:
            rates = [_r(f[k]) for k in ("paste_flip_rate", "control_flip_rate", "blank_flip_rate",
                                         "control_blank_flip_rate")]
            lines.append(f"| {names[f['class']]} | `{f['box']}` | " + " | ".join(rates)
                         + f" | {'yes' if f['suspected'] else 'no'} |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/audit_demo", help="where the audits run (resumable)")
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    os.chdir(ROOT)
    runs = [run(k, work) for k in MODELS]
    text = ["# `onnxsal audit` on the planted-tag demonstration", "",
            "Written by `benchmarks/audit_demo.py` (`OMP_NUM_THREADS=1 python benchmarks/audit_demo.py`): "
            "the audit's default settings, one onnxruntime thread. The tag is the 4x4 square at rows 2..5, "
            "columns 2..5 (box `[2, 2, 6, 6]`) on 90% of class 2's (Pullover's) images; the finder and its "
            "thresholds: [README.md](README.md).", ""]
    for r in runs:
        text += describe(r)
    (RESULTS / "audit_reports.md").write_text("\n".join(text))
    print(json.dumps({r["kind"]: [f["class"] for f in r["report"]["shortcuts"].get("findings", [])
                                  if f["suspected"]] for r in runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
