"""Un-broadcasting: the cotangent of a broadcast result summed back to an operand's shape.

Axes are summed where the operand has size 1 and the result more. Where shape inference
knows the sizes that is a ReduceSum over static axes; where only the run knows them (dynamic
H and W, a shape computed at run time), :func:`_split_sum` decides at run time by a route
valid at every opset the pass accepts (ReduceSum's axes are an attribute before opset 13).
"""

from __future__ import annotations

# elementwise operators whose inputs all broadcast together to the output
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
                          "PRelu"})


def unbroadcast(ctx, dy: str, x: str, y: str, skip_last: int = 0) -> str:
    """Sum ``dy`` ([K] + shape(y)) down to [K] + shape(x); ``skip_last`` trailing axes are not
    broadcast axes (MatMul's matrix axes)."""
    b = ctx.b
    sx, sy = ctx.shape(x), ctx.shape(y)
    rx, ry = ctx.rank(x), ctx.rank(y)
    lead = ry - rx
    out = dy
    if lead > 0:
        out = b.reduce("ReduceSum", out, list(range(1, lead + 1)), keepdims=False)
    partners = _partners(ctx, x, y, ry) if not skip_last else None
    static_axes, uncertain = [], []
    for i in range(rx - skip_last):
        dx_, dy_ = sx[i], sy[i + lead]
        if dx_ == 1:  # (a sum over a size-1 axis is no sum: right whatever y has)
            if dy_ != 1:
                static_axes.append(i + 1)
        elif isinstance(dx_, int) or (dx_ == dy_ and dx_ is not None):
            continue  # x's size is not 1, or is y's
        elif partners is not None and all(p == 1 for p in partners(i + lead)):
            continue  # every other operand has 1 here: y's size is x's own
        else:
            uncertain.append(i)
    if uncertain:
        out = _split_sum(b, out, x, uncertain)
    if static_axes:
        out = b.reduce("ReduceSum", out, static_axes, keepdims=True)
    return out


def _partners(ctx, x: str, y: str, ry: int):
    """For an elementwise broadcasting node computing y, a function of y's axis giving the
    static sizes of the other operands there (1 where an operand lacks the axis); None when
    some operand's rank is unknown or the node is not such a node."""
    node = ctx.node
    if node is None or node.op_type not in BROADCASTING or y not in node.output:
        return None
    shapes = [ctx.shape(i) for i in node.input if i and i != x]
    if any(s is None for s in shapes):
        return None
    return lambda axis: [s[axis - (ry - len(s))] if axis >= ry - len(s) else 1 for s in shapes]


def _split_sum(b, out: str, x: str, axes: list[int]) -> str:
    """Sum ``out`` ([K] + a broadcast of x's shape) over x's ``axes`` where x has size 1 at
    run time, keeping the others: each such axis of size n is reshaped to [1, n] when x_i is 1
    and to [n, 1] otherwise, and the second part summed, so the summed axes are static."""
    parts, summed, prev, rank = [b.shape(out, 0, 1)], [], 1, 1
    for i in axes:
        if i + 1 > prev:
            parts.append(b.shape(out, prev, i + 1))
            rank += i + 1 - prev
        xi, one = b.shape(x, i, i + 1), b.ints([1])
        parts += [xi, b.op("Where", [b.op("Equal", [xi, one]), b.shape(out, i + 1, i + 2), one])]
        summed.append(rank + 1)
        rank += 2
        prev = i + 2
    parts.append(b.shape(out, prev))
    split = b.op("Reshape", [out, b.concat(parts)], hint="split")
    return b.reduce("ReduceSum", split, summed, keepdims=False)
