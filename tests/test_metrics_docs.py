"""Every metric registered in onnxsal/metrics has a section in the docs, headed with its
registered name in backticks (docs/metrics.md, or the page of a metric family)."""

from __future__ import annotations

import re
from pathlib import Path

from onnxsal.metrics import base as metrics

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _headed_names() -> set[str]:
    names = set()
    for page in DOCS.glob("*.md"):
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                names.update(re.findall(r"`([^`]+)`", line))
    return names


def test_every_builtin_metric_has_a_docs_section():
    builtin = [n for n in metrics.names()
               if metrics.get(n).__module__.startswith("onnxsal.metrics.")]
    assert {"sparseness", "pointing-game", "black-white-deletion"} <= set(builtin)
    missing = sorted(set(builtin) - _headed_names())
    assert not missing, f"registered metrics without a docs heading: {missing}"
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    for n in ("random-logit", "completeness", "input-invariance", "sparseness", "complexity",
              "effective-complexity", "pointing-game", "relevance-mass-accuracy",
              "relevance-rank-accuracy", "attribution-localisation", "localisation-auc"):
        assert re.search(rf"^#+ .*`{re.escape(n)}`", text, re.M), n
