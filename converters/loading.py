"""Shared helpers of the converters: resolve a ``module:function`` source to an object."""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from onnxsal.errors import OptionError


def import_object(spec: str) -> Any:
    """Resolve ``module:attr`` (the module importable from the current folder or PYTHONPATH):
    a function or class is called without arguments and its result returned (a factory that
    builds the model); anything else is returned as is."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise OptionError(f"{spec!r}: expected 'module:function'")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: the current folder
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise OptionError(f"{spec!r}: cannot import module '{mod_name}' ({exc})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"{spec!r}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        obj = obj()
    return obj


__all__ = ["import_object"]
