"""Fusions: one backward for a group of forward nodes where the rules would emit one each.

Element-wise regions. A region is a group of element-wise nodes (unary ops with a slope,
Add/Sub/Mul/Div) that computes a tensor y from a single variable tensor x and constants, whose
intermediate tensors are read only inside the region: swish x*Sigmoid(x), hard-swish x*HardSigmoid(x), GELU as
exporters write it (x * 0.5 * (1 + Erf(x / sqrt 2))), and the like. Its Jacobian is diagonal,
so dx = dy * dy/dx, with dy/dx computed by forward-mode differentiation over the region on the
forward tensors ([N, ...], once) instead of pushing every seed row's cotangent ([K, N, ...])
through each node and summing the paths. The interior nodes then get no cotangent and the pass
skips them.

MaxPool after Relu. The pooled positions hold the window maxima, so the Relu's derivative
there is 1 exactly when the pooled value is > 0: the mask is applied to the pooled cotangent
(a quarter of the plane for 2x2 strides) and the Relu's own backward is skipped.
"""

from __future__ import annotations

from .rules.elementwise import SLOPES
from .rules.registry import DEFAULT

ARITHMETIC = ("Add", "Sub", "Mul", "Div")
ZERO = "<zero>"  # the tangent of a constant; None stands for the tangent 1 (of x itself)


def _member(ctx, node) -> bool:
    """An element-wise node the region may contain (default rules only: a rule set that
    overrides one of them, guided backprop's Relu, must see its own cotangent)."""
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return False
    op = node.op_type
    if ctx.rules.get(op) is not DEFAULT.get(op):
        return False
    if op in SLOPES:
        return all(ctx.const(i) is not None for i in node.input[1:] if i)
    return op in ARITHMETIC and len(node.input) == 2


def _variables(ctx, node) -> list[str]:
    ins = node.input[:1] if node.op_type in SLOPES else node.input
    return [i for i in ins if i and ctx.const(i) is None]


def region(ctx, root) -> tuple[str, list] | None:
    """(x, nodes in graph order) of the element-wise region ending at ``root``, or None when
    it has fewer than two nodes, more than one variable, or changes the shape."""
    if not _member(ctx, root):
        return None
    nodes = {id(root): root}
    grown = True
    while grown:
        grown = False
        reads: dict[str, int] = {}
        for n in nodes.values():
            for t in _variables(ctx, n):
                reads[t] = reads.get(t, 0) + 1
        for t, count in reads.items():
            p = ctx.producer(t)
            if (p is not None and id(p) not in nodes and count == ctx.uses(t) and t not in ctx.wrt
                    and _member(ctx, p)):
                nodes[id(p)] = p
                grown = True
    if len(nodes) < 2:
        return None
    made = {n.output[0] for n in nodes.values()}
    leaves = {t for n in nodes.values() for t in _variables(ctx, n) if t not in made}
    if len(leaves) != 1:
        return None
    x = leaves.pop()
    shape = ctx.shape(x)
    if not shape or any(d is None for d in shape) or not ctx.needs_grad(x):
        return None
    if any(ctx.shape(n.output[0]) != shape for n in nodes.values()):
        return None  # a constant operand broadcasts the result beyond x's shape
    return x, sorted(nodes.values(), key=ctx.position)


def gradient(ctx, node, dys: list) -> tuple[str, str | None] | None:
    """(x, dx): the cotangent of a tensor x upstream of ``node`` that replaces the backward of
    the nodes between them, or None (then the node's own rule runs)."""
    if len(dys) != 1 or dys[0] is None:
        return None
    return _region_gradient(ctx, node, dys[0]) or _pool_after_relu(ctx, node, dys[0])


def _pool_after_relu(ctx, node, dy: str):
    if node.op_type != "MaxPool" or ctx.rules.get("MaxPool") is not DEFAULT.get("MaxPool"):
        return None
    r = node.input[0]
    relu = ctx.producer(r)
    if (relu is None or relu.op_type != "Relu" or ctx.uses(r) != 1 or r in ctx.wrt
            or ctx.rules.get("Relu") is not DEFAULT.get("Relu") or not ctx.needs_grad(relu.input[0])):
        return None
    b = ctx.b
    y = node.output[0]
    mask = b.op("Cast", [b.op("Greater", [y, ctx.scalar(0, y)])], to=ctx.dtype(y))
    return relu.input[0], DEFAULT["MaxPool"].fn(ctx, node, [b.op("Mul", [dy, mask])])[0]


def _region_gradient(ctx, root, dy: str):
    found = region(ctx, root)
    if found is None:
        return None
    x, nodes = found
    b = ctx.b
    tan: dict[str, str | None] = {x: None}

    def t_of(name):
        return tan.get(name, ZERO) if ctx.const(name) is None else ZERO

    def times(t, v):
        if t == ZERO:
            return ZERO
        return v if t is None else b.op("Mul", [t, v])

    def plus(t, u, minus=False):
        if u == ZERO:
            return t
        if t == ZERO:
            return (b.op("Neg", [u]) if u is not None else ctx.scalar(-1.0, x)) if minus else u
        one = ctx.scalar(1.0, x)
        return b.op("Sub" if minus else "Add", [one if t is None else t, one if u is None else u])

    for n in nodes:
        op, out = n.op_type, n.output[0]
        if op in SLOPES:
            slope = SLOPES[op](ctx, n)
            t = t_of(n.input[0])
            tan[out] = t if slope is None else times(t, slope)
            continue
        a, c = n.input
        ta, tc = t_of(a), t_of(c)
        if op in ("Add", "Sub"):
            tan[out] = plus(ta, tc, minus=op == "Sub")
        elif op == "Mul":  # (ac)' = a'c + ac'
            tan[out] = plus(times(ta, c), times(tc, a))
        else:  # (a/c)' = (a' - y c') / c
            num = plus(ta, times(tc, out), minus=True)
            tan[out] = ZERO if num == ZERO else b.op("Div", [ctx.scalar(1.0, x) if num is None else num, c])
    t = tan[root.output[0]]
    if t == ZERO:
        return x, None
    return x, dy if t is None else b.op("Mul", [dy, t])
