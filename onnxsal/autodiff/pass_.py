"""The reverse-mode pass: ONNX model in, ONNX model with its backward graph out (the contract
of the augmented model is in :mod:`.contract`).

The forward pass runs once; the backward pass treats the K seed rows as one leading axis
(folded into the batch axis for convolutions), so one run returns every class. The phases:
:func:`.prepare.prepare` (inlining, lowering, opsets, shapes, active path), then
:func:`.reverse.reverse` (seed, walk, outputs), then the roles of :mod:`.contract`.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from ..model import set_ir_version
from .contract import write_roles
from .prepare import prepare
from .reverse import reverse
from .rules.registry import Rule, table


def augment(model: onnx.ModelProto, wrt: Sequence[str] | None = None, rules: str = "default",
            logits: str | None = None, options: dict | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with its backward graph (see :mod:`.contract`).

    ``wrt``: tensors to differentiate with respect to (default: the image input).
    ``rules``: a rule set (:func:`.rules.registry.ruleset_names`). ``logits``: the tensor
    whose cotangent is seeded (default: found by :func:`onnxsal.model.find_logits`).
    ``options``: rule-set parameters, e.g. ``{"epsilon": 1e-6}`` for ``lrp``.
    """
    rule_table: dict[str, Rule] = table(rules)
    analysis = prepare(model, wrt, logits, rule_table)
    meta = reverse(analysis, rule_table, rules, dict(options or {}))
    write_roles(analysis.model, meta)
    return set_ir_version(analysis.model)
