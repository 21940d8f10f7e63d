"""Saliency methods, all computed through :class:`onnxsal.engine.Engine`.

Every method has one call shape, ``METHODS[name](engine, images, targets=None, **options)
-> Maps`` (see :mod:`.base`), and declares what it needs from the engine (``needs``: some of
"forward", "gradients", "class_gradients", "intermediate_gradients") and whether its map is
signed. :func:`compute` runs several methods on the same images and shares the work they have
in common (the logits, g_c, and one walk over the per-class Jacobian for active/inactive).

Definitions: docs/definitions.md#score, #signed-maps and #method-defaults.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import OptionError
from . import cam, gradient, perturbation
from .base import NEEDS, Maps, Method, as_batch, resolve_targets
from .normalize import maxabs, minmax

METHODS: dict[str, Method] = {
    cls.name: cls()
    for cls in gradient.METHOD_CLASSES + cam.METHOD_CLASSES + perturbation.METHOD_CLASSES
}
_ALIASES = {a: m.name for m in METHODS.values() for a in m.aliases}


def names() -> list[str]:
    """Method names in display order (the five signed maps first)."""
    return list(METHODS)


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def get(name: str) -> Method:
    """The method called ``name`` (case and '-'/'_' insensitive; a few aliases, e.g. 'ig')."""
    k = _key(name)
    k = _ALIASES.get(k, k)
    if k not in METHODS:
        raise OptionError(f"unknown method '{name}' (choose from: {', '.join(METHODS)}, or all)")
    return METHODS[k]


def resolve(methods: str | Iterable[str]) -> list[str]:
    """Canonical names for a name, a list of names, or 'all' (duplicates dropped)."""
    if isinstance(methods, str):
        methods = [methods]
    out: list[str] = []
    for m in methods:
        for name in (names() if _key(m) == "all" else [get(m).name]):
            if name not in out:
                out.append(name)
    if not out:
        raise OptionError("no method given")
    return out


def compute(engine, images, methods: str | Iterable[str] = "all", targets=None,
            **options: Any) -> dict[str, Maps]:
    """Run several methods on the same images; return {method name: Maps}.

    ``options``: either ``<method>={option: value}`` for one method (e.g.
    ``integrated_gradients={"steps": 200}``) or ``option=value`` given to every selected
    method that has that option (e.g. ``seed=1``). An option no selected method knows raises
    OptionError. Targets default to each image's predicted class, computed once.
    """
    selected = resolve(methods)
    per_method: dict[str, dict[str, Any]] = {name: {} for name in selected}
    common: dict[str, Any] = {}
    for key, value in options.items():
        k = _key(key)
        if k in METHODS or k in _ALIASES:
            name = get(k).name
            if name not in per_method:
                raise OptionError(f"options given for method '{name}', which is not selected")
            if not isinstance(value, dict):
                raise OptionError(f"options for method '{name}' must be a dict, got {value!r}")
            per_method[name].update(value)
        else:
            common[key] = value
    for key in common:
        if not any(key in METHODS[name].defaults for name in selected):
            raise OptionError(f"no selected method has an option '{key}'")
    x = as_batch(engine, images)
    shared: dict = {}
    t, _ = resolve_targets(engine, x, targets, shared)
    out: dict[str, Maps] = {}
    signed = [n for n in selected if n in gradient.SIGNED_FAMILY]
    if signed:
        chunks = {per_method[n].get("chunk", common.get("chunk")) for n in signed}
        if len(chunks) == 1 and all(set(per_method[n]) <= {"chunk"} for n in signed):
            res = gradient.signed_maps(engine, x, t, signed, chunks.pop(), shared)
            out.update(res)
    for name in selected:
        if name in out:
            continue
        m = METHODS[name]
        opts = {k: v for k, v in common.items() if k in m.defaults}
        opts.update(per_method[name])
        out[name] = m(engine, x, t, _shared=shared, **opts)
    return {name: out[name] for name in selected}


__all__ = ["METHODS", "NEEDS", "Maps", "Method", "compute", "get", "names", "resolve",
           "minmax", "maxabs"]
