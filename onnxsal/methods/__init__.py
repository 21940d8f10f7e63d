"""Saliency methods, all computed through :class:`onnxsal.engine.Engine`.

Every method has one call shape, ``METHODS[name](engine, images, targets=None, **options)
-> Maps`` (see :mod:`.base`), and declares what it needs from the engine (``needs``: some of
"forward", "gradients", "class_gradients", "intermediate_gradients"), whether its map is
signed, its backward rule set and its group. Methods register themselves (:mod:`.registry`;
docs/extending.md). :func:`compute` runs several methods on the same images and shares the
work they have in common (the logits, g_c per rule set, and one call per group, e.g. one walk
over the per-class Jacobian for active/inactive).

Definitions: docs/definitions.md#score, #signed-maps and #method-defaults.
"""

from __future__ import annotations

from typing import Any, Iterable

from .. import plugins
from ..errors import OptionError

# isort: off
from . import gradient, cam, perturbation  # noqa: F401  (registration, in display order)
# isort: on
from .base import NEEDS, Maps, Method, as_batch, resolve_targets
from .normalize import maxabs, minmax
from .registry import ALIASES, METHODS, get, key, names

plugins.discover(__name__, __path__)  # any other module of this package, then the plugins
plugins.load()


def _in_all() -> list[str]:
    return [n for n in names() if METHODS[n].in_all]


def resolve(methods: str | Iterable[str]) -> list[str]:
    """Canonical names for a name, a list of names, or 'all' (duplicates dropped; 'all' leaves
    out the methods that need an option the user must give, ``Method.in_all``)."""
    if isinstance(methods, str):
        methods = [methods]
    out: list[str] = []
    for m in methods:
        for name in (_in_all() if key(m) == "all" else [get(m).name]):
            if name not in out:
                out.append(name)
    if not out:
        raise OptionError("no method given")
    return out


def _split_options(selected: list[str], options: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """{method: the options it is given} from compute()'s ``options`` (see there)."""
    per_method: dict[str, dict[str, Any]] = {name: {} for name in selected}
    common: dict[str, Any] = {}
    for k, value in options.items():
        if key(k) in METHODS or key(k) in ALIASES:
            name = get(k).name
            if name not in per_method:
                raise OptionError(f"options given for method '{name}', which is not selected")
            if not isinstance(value, dict):
                raise OptionError(f"options for method '{name}' must be a dict, got {value!r}")
            per_method[name].update(value)
        else:
            common[k] = value
    for k in common:
        if not any(k in METHODS[name].defaults for name in selected):
            raise OptionError(f"no selected method has an option '{k}'")
    for name, given in per_method.items():
        defaults = METHODS[name].defaults
        per_method[name] = {**{k: v for k, v in common.items() if k in defaults}, **given}
    return per_method


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal option dicts (values that do not compare to one bool, e.g. arrays, by identity)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        try:
            if not (a[k] is b[k] or bool(a[k] == b[k])):
                return False
        except (TypeError, ValueError):
            return False
    return True


def compute(engine, images, methods: str | Iterable[str] = "all", targets=None,
            **options: Any) -> dict[str, Maps]:
    """Run several methods on the same images; return {method name: Maps}.

    ``options``: either ``<method>={option: value}`` for one method (e.g.
    ``integrated_gradients={"steps": 200}``) or ``option=value`` given to every selected
    method that has that option (e.g. ``seed=1``). An option no selected method knows raises
    OptionError. Targets default to each image's predicted class, computed once. Selected
    methods of one ``group`` given the same options are computed by one ``run_group`` call.
    """
    selected = resolve(methods)
    per_method = _split_options(selected, options)
    x = as_batch(engine, images)
    shared: dict = {}
    t, _ = resolve_targets(engine, x, targets, shared)
    out: dict[str, Maps] = {}
    groups: dict[str, list[str]] = {}
    for name in selected:
        if METHODS[name].group:
            groups.setdefault(METHODS[name].group, []).append(name)
    for members in groups.values():
        opts = [METHODS[n].options(per_method[n]) for n in members]
        if all(_same(o, opts[0]) for o in opts):
            out.update(type(METHODS[members[0]]).run_group(engine, x, t, members, opts[0], shared))
    for name in selected:
        if name not in out:
            out[name] = METHODS[name](engine, x, t, _shared=shared, **per_method[name])
    return {name: out[name] for name in selected}


__all__ = ["METHODS", "NEEDS", "Maps", "Method", "compute", "get", "names", "resolve",
           "minmax", "maxabs"]
