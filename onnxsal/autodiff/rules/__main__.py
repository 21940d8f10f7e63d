"""``python -m onnxsal.autodiff.rules --markdown``: the covered operators, one line per rule
family (the family's title, then its registered ops), as a Markdown list for the docs."""

from __future__ import annotations

import collections
import importlib
import sys

from .registry import DEFAULT


def covered_markdown() -> str:
    """One ``- Title: Op, Op.`` line per module that registers default rules, in module order."""
    families: dict[str, list[str]] = collections.defaultdict(list)
    for op, r in DEFAULT.items():
        families[r.fn.__module__].append(op)
    lines = []
    for module in sorted(families):
        doc = importlib.import_module(module).__doc__ or module
        title = doc.strip().splitlines()[0].split(":")[0].rstrip(".")
        lines.append(f"- {title}: {', '.join(sorted(families[module]))}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m onnxsal.autodiff.rules --markdown")
    sys.stdout.write(covered_markdown())
