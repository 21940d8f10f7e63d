"""Shared helpers of the converters: resolve a ``module:function`` source to an object."""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from onnxsal.errors import OptionError, first_line


def import_object(spec: str) -> Any:
    """Resolve ``module:attr`` (the module importable from the current folder or PYTHONPATH):
    a function or class is called without arguments and its result returned (a factory that
    builds the model); anything else is returned as is."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise OptionError(f"{spec!r}: expected 'module:function'")
    if "/" in mod_name or "\\" in mod_name or mod_name.endswith(".py"):
        raise OptionError(f"{spec!r}: give the module's import name (pkg.module:function, "
                          "importable from the current folder or PYTHONPATH), not a file path")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: the current folder
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise OptionError(f"{spec!r}: cannot import module '{mod_name}' ({exc})") from None
    except Exception as exc:  # the user's module failed while it ran: say where, in one line
        raise OptionError(f"{spec!r}: importing module '{mod_name}' failed "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"{spec!r}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise OptionError(f"{spec!r}: calling {attr}() failed ({type(exc).__name__}: "
                              f"{first_line(exc)}); SOURCE names a function that takes no "
                              "arguments and returns the model") from None
    return obj


__all__ = ["import_object"]
