"""The registry of saliency methods (docs/extending.md).

A :class:`~.base.Method` subclass that defines a ``name`` registers itself when its class
is defined, so importing its module is all it takes. Display order (``names()``, ``-m all``,
the order of figures and of ``maps.npz``) is registration order: the built-in modules as
``onnxsal.methods`` imports them (the five signed maps first), then any other module of the
package (by module name), then plugins (:mod:`onnxsal.plugins`).
"""

from __future__ import annotations

from ..errors import OptionError

#: {canonical name: method instance}, in display order.
METHODS: dict = {}
#: {alias: canonical name}.
ALIASES: dict[str, str] = {}


def key(name: str) -> str:
    """The lookup form of a method name: lower case, '-' and ' ' as '_'."""
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def _origin(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls) -> None:
    """Add an instance of the Method subclass ``cls`` under ``cls.name`` and its aliases.

    Defining the same class again (a reloaded module) replaces it in place; another class
    taking a name or alias that is already used is a programming error (TypeError).
    """
    name = cls.name
    if key(name) != name:
        raise TypeError(f"method name {name!r} of {_origin(cls)} must be lower case, with '_'")
    old = METHODS.get(name)
    if old is not None and _origin(type(old)) != _origin(cls):
        raise TypeError(f"method '{name}' of {_origin(cls)} is already registered by "
                        f"{_origin(type(old))}")
    if name in ALIASES:
        raise TypeError(f"method name '{name}' of {_origin(cls)} is an alias of '{ALIASES[name]}'")
    aliases = {key(a) for a in cls.aliases}
    for a in aliases:
        owner = a if a in METHODS else ALIASES.get(a)
        if owner not in (None, name):
            raise TypeError(f"alias '{a}' of method '{name}' is already used by '{owner}'")
    for a in [a for a, n in ALIASES.items() if n == name]:
        del ALIASES[a]
    METHODS[name] = cls()
    ALIASES.update(dict.fromkeys(aliases, name))


def names() -> list[str]:
    """Method names in display order (the five signed maps first)."""
    return list(METHODS)


def get(name: str):
    """The method called ``name`` (case and '-'/'_' insensitive; a few aliases, e.g. 'ig')."""
    k = key(name)
    k = ALIASES.get(k, k)
    if k not in METHODS:
        raise OptionError(f"unknown method '{name}' (choose from: {', '.join(METHODS)}, or all)")
    return METHODS[k]
