"""Code from outside the package that registers methods or rule sets (docs/extending.md).

A plugin is a Python module; importing it registers what it defines (a ``Method`` subclass,
a ``rule(..., ruleset=...)``). Loaded: the modules named by the ``onnxsal.plugins`` entry
points of installed distributions (once, when :mod:`onnxsal.methods` is imported or a rule
set is looked up), and the modules or ``.py`` files the user names (``onnxsal --plugin``).
Plugins are code the user installed or named; nothing is ever loaded from a model file.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import OptionError

GROUP = "onnxsal.plugins"
_done: set[str] = set()


def _import(label: str, load) -> None:
    try:
        load()
    except Exception as e:  # a plugin's own failure, reported as one line
        raise OptionError(f"plugin {label} could not be loaded: {type(e).__name__}: {e}") from e


def _import_file(path: Path) -> None:
    name = f"onnxsal_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"not a Python module: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load(modules=()) -> None:
    """Import the entry-point plugins (first call only) and ``modules`` (names or .py paths)."""
    if GROUP not in _done:
        _done.add(GROUP)
        for ep in entry_points(group=GROUP):
            _import(f"'{ep.value}' (entry point '{ep.name}' of {GROUP})", ep.load)
    for m in modules:
        if m in _done:
            continue
        if m.endswith(".py"):
            _import(f"'{m}'", lambda p=Path(m): _import_file(p))
        else:
            _import(f"'{m}'", lambda m=m: importlib.import_module(m))
        _done.add(m)


def discover(package: str, path) -> None:
    """Import every public module of ``package`` (at ``path``) not imported yet, in name order:
    a method or metric added to the package is one new module, listed nowhere else."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
