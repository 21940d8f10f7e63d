"""The table of backward rules: one small function per ONNX operator type.

A rule receives the pass context, the forward node, and the cotangents of the node's outputs
(``None`` where an output has no cotangent), and returns one cotangent name (or ``None``) per
input. A cotangent of a tensor of shape S has shape [K] + S: the seed axis K leads.

A rule set is a dictionary that overrides a few entries of the default table by name; it
exists as soon as one rule is registered under its name (``rule(op, ruleset=name)``: the
built-in ones in :mod:`.modified`, others from plugins, docs/extending.md), and the pass
itself never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ... import plugins
from ...errors import OptionError

RuleFn = Callable[..., list]


@dataclass(frozen=True)
class Rule:
    fn: RuleFn
    # the default-domain opset the emitted nodes need: a number, or a function of the forward
    # node (e.g. a scatter-add is needed only when windows overlap)
    min_opset: int | Callable = 0

    def opset_for(self, node) -> int:
        return self.min_opset(node) if callable(self.min_opset) else self.min_opset


DEFAULT: dict[str, Rule] = {}
RULESETS: dict[str, dict[str, Rule]] = {"default": DEFAULT}


def rule(*op_types: str, min_opset: int | Callable = 0, ruleset: str = "default"):
    """Register ``fn`` as the backward rule of each op type in ``op_types``."""

    def deco(fn: RuleFn) -> RuleFn:
        table = RULESETS.setdefault(ruleset, {})
        for op in op_types:
            table[op] = Rule(fn, min_opset)
        return fn

    return deco


def _load() -> None:
    """Import the plugins' rules (the built-in ones register when the package is imported)."""
    plugins.load()


def ruleset_names() -> list[str]:
    """The known rule sets: ``default``, then the others in registration order."""
    _load()
    return list(RULESETS)


def table(name: str = "default") -> dict[str, Rule]:
    """The effective rule table of a rule set: the default rules with its overrides.

    An unknown name raises OptionError naming the known ones."""
    _load()
    if name not in RULESETS:
        raise OptionError(f"unknown rule set '{name}' (choose from: {', '.join(RULESETS)})")
    merged = dict(DEFAULT)
    merged.update(RULESETS[name])
    return merged


def supported_ops(name: str = "default") -> list[str]:
    return sorted(table(name))


def packaged(name: str = "default") -> bool:
    """True when every rule of the rule set's table is onnxsal's own: a gradient model built
    with it depends only on the onnxsal version, so it may be cached on disk (a plugin's rules
    may change between runs under the same name)."""
    return all(r.fn.__module__.startswith("onnxsal.") for r in table(name).values())
