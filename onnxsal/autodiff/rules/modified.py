"""Named rule sets that override a few default rules (docs/gradient-pass.md#rule-sets), each
named by the method that uses it (``Method.rules``); more come from plugins (docs/extending.md).

* ``guided``: guided backpropagation; at every ReLU the cotangent is
  1[x > 0] * max(dy, 0) (also at Clip with a lower bound of 0, i.e. ReLU6).
* ``lrp``: epsilon-LRP as a modified gradient; before the usual backward of a linear layer
  z = Wx + b (Conv, Gemm, MatMul) the cotangent is scaled by z / (z + eps * sign(z)), with
  sign(0) taken as +1. Relevance at the input is x times the resulting gradient.
  ``epsilon`` comes from the pass options (default 1e-6).
"""

from __future__ import annotations

from .registry import DEFAULT, rule

DEFAULT_EPSILON = 1e-6


@rule("Relu", ruleset="guided")
def guided_relu(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    zero = ctx.scalar(0.0, x)
    mask = b.op("Cast", [b.op("Greater", [x, zero])], to=ctx.dtype(x))
    return [b.op("Mul", [b.op("Relu", [dys[0]]), mask])]


@rule("Clip", ruleset="guided")
def guided_clip(ctx, node, dys):
    """ReLU6 and other clips with a lower bound of 0 are ReLUs too: the cotangent that passes
    the clip's mask is also clipped at 0. Other clips keep the plain rule."""
    grads = DEFAULT["Clip"].fn(ctx, node, dys)
    lo = ctx.input(node, 1) if ctx.opset >= 11 else None
    lo_value = ctx.const(lo) if lo is not None else ctx.attr(node, "min")
    if lo_value is not None and float(lo_value) == 0.0 and grads[0] is not None:
        grads[0] = ctx.b.op("Relu", [grads[0]])
    return grads


def _lrp_epsilon(op_type: str):
    def lrp_rule(ctx, node, dys):
        b = ctx.b
        z = node.output[0]
        eps = float(ctx.options.get("epsilon", DEFAULT_EPSILON))
        zero = ctx.scalar(0.0, z)
        sign = b.op("Where", [b.op("Less", [z, zero]), ctx.scalar(-1.0, z), ctx.scalar(1.0, z)])
        stab = b.op("Add", [z, b.op("Mul", [sign, ctx.scalar(eps, z)])])
        scaled = b.op("Mul", [dys[0], b.op("Div", [z, stab])])
        return DEFAULT[op_type].fn(ctx, node, [scaled] + list(dys[1:]))

    return lrp_rule


for _op in ("Conv", "Gemm", "MatMul"):
    rule(_op, ruleset="lrp")(_lrp_epsilon(_op))
