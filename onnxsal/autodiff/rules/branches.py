"""Control flow: If with a run-time condition (a backward If on the same condition whose
branches are the differentiated branch bodies; see :mod:`onnxsal.autodiff.control_flow`).

Ops: If.
"""

from __future__ import annotations

from onnx import helper

from ..control_flow import effective_inputs, walk
from .registry import DEFAULT, rule


def _branches(node):
    return [next(a.g for a in node.attribute if a.name == name) for name in ("then_branch", "else_branch")]


def _if_opset(node) -> int:
    """The opset the rules of the branches' nodes need."""
    return max([DEFAULT[n.op_type].opset_for(n) for g in _branches(node) for n in walk(g.node)
                if n.op_type in DEFAULT] + [0])


@rule("If", min_opset=_if_opset)
def if_rule(ctx, node, dys):
    """dIf: a backward If on the same condition (see the module docstring)."""
    reads = effective_inputs(node)[len(node.input):]
    wanted = [r for r in reads if ctx.needs_grad(r)]
    if not wanted:
        return [None] * (len(node.input) + len(reads))
    bodies = [ctx.branch_gradient(g, dys, wanted) for g in _branches(node)]
    outs = [ctx.b.fresh("if_grad") for _ in wanted]
    ctx.b.nodes.append(helper.make_node("If", [node.input[0]], outs, name=ctx.b.fresh("If_grad"),
                                        then_branch=bodies[0], else_branch=bodies[1]))
    grads = dict(zip(wanted, outs))
    return [None] * len(node.input) + [grads.get(r) for r in reads]
