"""The Python API example of docs/audit.md runs as written (so the page cannot rot), and gives
what it says."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "audit.md"


def example() -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/audit.md lost its marked Python example"
    return m.group(1)


def test_the_readme_shows_the_same_example():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert m and m.group(1) == example(), "README.md's Python example differs from docs/audit.md's"


def test_the_documented_example_runs(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")  # the paths of the example
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example(), str(DOC), "exec"), ns)
    maps, bench, report, engine = ns["maps"], ns["bench"], ns["report"], ns["engine"]
    assert maps["gradcam"].maps.shape == (20, 20, 20)
    assert np.array_equal(maps["vanilla"].targets, engine.predict(ns["data"].images))
    assert [r["method"] for r in bench["results"]] == ["vanilla", "gradcam"]
    assert (tmp_path / "out" / "api-benchmark" / "results.json").is_file()
    assert (tmp_path / "out" / "api-audit" / "report.html").is_file()
    assert 0.9 <= report["predictions"]["accuracy"] <= 0.95  # 186 of the 200 bundled digits
    out = printed.getvalue()
    assert "(20, 20, 20)" in out and "vanilla black AUC" in out and "accuracy 0.93" in out
    assert os.path.basename(os.getcwd()) == tmp_path.name
