"""The repository passes its linters: ruff (pyproject.toml [tool.ruff]) and mypy ([tool.mypy])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The linter installed beside this Python (the dev extra), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean():
    r = _run(_tool("ruff"), "check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("package", ["onnxsal/autodiff", "onnxsal/methods", "onnxsal/metrics"])
def test_mypy_is_clean(package):
    r = _run(_tool("mypy"), "--no-incremental", package)
    assert r.returncode == 0, r.stdout + r.stderr
