"""``onnxsal audit``: one command, one report (docs/audit.md).

* :func:`run_audit` (:mod:`.driver`): the checks, ``audit.json`` and ``report.html``;
* :func:`fold_review` (:mod:`.review`): an expert's review file folded back into the report;
* :mod:`.sections`, :mod:`.summary`, :mod:`.html`, :mod:`.figures`, :mod:`.store`: the parts.
"""

from .driver import DEFAULT_METHODS, run_audit
from .review import fold_review, load_review

__all__ = ["run_audit", "fold_review", "load_review", "DEFAULT_METHODS"]
