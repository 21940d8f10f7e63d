"""Shape and indexing operators, and reductions.

Every axis attribute is shifted by one for the leading seed axis K (after normalising negative
axes). Selections (Slice, Gather, Pad with reflect/edge) use one idea: apply the forward op to
a tensor holding each element's flat index, then scatter the cotangent back to those indices.

Ops: Concat, CumSum, DepthToSpace, Expand, Flatten, Gather, GatherElements, GatherND, Pad,
ReduceL1, ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceMax, ReduceMean, ReduceMin, ReduceProd,
ReduceSum, ReduceSumSquare, Reshape, ScatterND, Slice, SpaceToDepth, Split, Squeeze, Tile,
Transpose, Trilu, Unsqueeze.
"""

from __future__ import annotations

import numpy as np

from ...errors import ModelError
from ...onnx_util import attribute
from .common import filled, index_tensor
from .registry import rule


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes_of(ctx, node, input_index: int):
    """Axes of a node given as an attribute (old opsets) or a constant input (new ones)."""
    a = ctx.attr(node, "axes")
    if a is not None:
        return list(a)
    name = ctx.input(node, input_index)
    if name is None:
        return None
    c = ctx.const(name)
    if c is None:
        raise ModelError(f"{node.op_type} node '{node.name}' has run-time axes; only constant axes "
                         f"are supported")
    return [int(v) for v in np.atleast_1d(c)]


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, dys):
    return [ctx.b.reshape_cot(dys[0], node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose(ctx, node, dys):
    r = ctx.rank(node.input[0])
    perm = list(ctx.attr(node, "perm", list(range(r))[::-1]))
    inv = [0] * r
    for i, p in enumerate(perm):
        inv[p] = i
    return [ctx.b.op("Transpose", [dys[0]], perm=[0] + [i + 1 for i in inv])]


@rule("Concat")
def concat(ctx, node, dys):
    b = ctx.b
    r = ctx.rank(node.output[0])
    axis = _norm(ctx.attr(node, "axis"), r)
    sizes = [(ctx.shape(x) or [None] * r)[axis] for x in node.input]
    out = []
    start: int | str = 0
    for x, size in zip(node.input, sizes):
        if isinstance(start, int) and isinstance(size, int):
            end = start + size
            s_name, e_name = b.ints([start]), b.ints([end])
        else:
            s_name = b.ints([start]) if isinstance(start, int) else start
            e_name = b.op("Add", [s_name, b.shape(x, axis, axis + 1)])
            end = e_name
        if ctx.needs_grad(x):
            out.append(b.op("Slice", [dys[0], s_name, e_name, b.ints([axis + 1])]))
        else:
            out.append(None)
        start = end
    return out


@rule("Split")
def split(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    r = ctx.rank(x)
    axis = _norm(ctx.attr(node, "axis", 0), r)
    parts = [dy if dy is not None else b.zeros_cot(y, ctx.dtype(x)) for dy, y in zip(dys, node.output)]
    return [b.op("Concat", parts, axis=axis + 1)] + [None] * (len(node.input) - 1)


def _scatter_back(ctx, x: str, picked: str, dy: str, add: bool) -> str:
    """Scatter dy ([K] + shape(picked)) into zeros of [K] + shape(x) at the flat indices picked."""
    b = ctx.b
    if add and ctx.opset < 16:
        raise ModelError(f"{ctx.node.op_type} node '{ctx.node.name}' may pick an element twice; its "
                         f"gradient needs opset 16 (the model has {ctx.opset})")
    idx = b.op("Reshape", [picked, b.ints([1, -1])])
    idx = b.op("Expand", [idx, b.concat([b.k_name, b.ints([1])])])
    upd = b.op("Reshape", [dy, b.concat([b.k_name, b.ints([-1])])])
    size = b.op("Reshape", [b.op("Size", [x]), b.ints([1])])
    zero = b.op("ConstantOfShape", [b.concat([b.k_name, size])], value=filled(ctx.dtype(x), 0))
    kw = {"reduction": "add"} if add else {}
    out = b.op("ScatterElements", [zero, idx, upd], axis=1, **kw)
    return b.reshape_cot(out, x)


@rule("Slice")
def slice_(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    r = ctx.rank(x)
    consts = [ctx.const(t) if t else None for t in node.input[1:]]
    c_starts, c_ends = (consts + [None, None])[:2]
    if ctx.opset >= 10 and c_starts is not None and c_ends is not None:
        starts, ends = [int(v) for v in c_starts], [int(v) for v in c_ends]
        axes = [int(v) for v in consts[2]] if len(consts) > 2 and consts[2] is not None else list(range(len(starts)))
        steps = [int(v) for v in consts[3]] if len(consts) > 3 and consts[3] is not None else [1] * len(starts)
        sx = ctx.shape(x) or [None] * r
        dims = [sx[_norm(a, r)] for a in axes]
        if all(s == 1 for s in steps) and all(isinstance(d, int) for d in dims):
            # a plain crop: the gradient is a zero Pad of the cotangent
            pads = [0] * (2 * (r + 1))
            for a, s, e, d in zip(axes, starts, ends, dims):
                a = _norm(a, r)
                s = min(max(s + d if s < 0 else s, 0), d)
                e = min(max(e + d if e < 0 else e, 0), d)
                pads[a + 1] = s
                pads[r + 1 + a + 1] = d - max(e, s)
            cut = [a for a in range(r + 1) if pads[a] or pads[r + 1 + a]]
            if len(cut) == 1:  # one axis: a placed slice (tiles join by Concat)
                a = cut[0]
                d = dims[[_norm(v, r) + 1 for v in axes].index(a)]
                return [b.place(dys[0], r + 1, a, pads[a], d - pads[r + 1 + a], d)] + [None] * (len(node.input) - 1)
            return [b.op("Pad", [dys[0], b.ints(pads)])] + [None] * (len(node.input) - 1)
    picked = b.op("Slice", [index_tensor(ctx, x)] + list(node.input[1:]))
    return [_scatter_back(ctx, x, picked, dys[0], add=False)] + [None] * (len(node.input) - 1)


def _gather_opset(node) -> int:
    # repeated (or run-time) indices need a scatter-add; the pass cannot see constants here,
    # so ask for opset 16 unless the rule can prove the indices unique (see gather())
    return 0


@rule("Gather")
def gather(ctx, node, dys):
    b = ctx.b
    x, ind = node.input
    r = ctx.rank(x)
    axis = _norm(ctx.attr(node, "axis", 0), r)
    c = ctx.const(ind)
    dim = (ctx.shape(x) or [None] * r)[axis]
    if c is not None and c.ndim <= 1 and c.size and isinstance(dim, int) and (-dim <= c).all() and (c < dim).all():
        # a constant index or run of indices (q, k, v of one projection; the class token):
        # a placed slice of the cotangent, no scatter
        first = int(c.flat[0]) + (dim if int(c.flat[0]) < 0 else 0)
        run = np.arange(first, first + c.size)
        if ((np.asarray(c) % dim).ravel() == run).all() and run[-1] < dim:
            src = b.unsqueeze(dys[0], [axis + 1]) if c.ndim == 0 else dys[0]
            return [b.place(src, r + 1, axis + 1, first, first + c.size, dim), None]
    picked = b.op("Gather", [index_tensor(ctx, x), ind], axis=axis)
    unique = c is not None and np.unique(c).size == c.size and (c >= 0).all()
    if unique or ctx.opset >= 16:
        return [_scatter_back(ctx, x, picked, dys[0], add=not unique), None]
    return [_gather_onehot(ctx, node, x, ind, axis, dys[0]), None]


def _gather_onehot(ctx, node, x, ind, axis, dy):
    """Gather's gradient without a scatter-add (opsets before 16): contract the cotangent
    with the one-hot matrix of the indices, [J, dim_axis]."""
    b = ctx.b
    r, q = ctx.rank(x), ctx.rank(ind)
    dim = b.shape(x, axis, axis + 1)
    dim_s = b.op("Squeeze", [dim, b.ints([0])]) if ctx.opset >= 13 else b.op("Squeeze", [dim], axes=[0])
    ind = b.op("Where", [b.op("Less", [ind, b.const(np.asarray(0, np.int64))]),
                         b.op("Add", [ind, dim]), ind])  # negative indices count from the end
    rng_ = b.op("Range", [b.const(np.asarray(0, np.int64)), dim_s, b.const(np.asarray(1, np.int64))])
    onehot = b.op("Cast", [b.op("Equal", [b.unsqueeze(ind, [q]), rng_])], to=ctx.dtype(x))
    onehot = b.op("Reshape", [onehot, b.concat([b.ints([-1]), dim])])  # [J, dim]
    # cotangent axes: K, x[:axis], ind..., x[axis+1:]  ->  K, x[:axis], x[axis+1:], ind...
    pre = list(range(0, axis + 1))
    ind_axes = list(range(axis + 1, axis + 1 + q))
    post = list(range(axis + 1 + q, r + q))
    t = b.op("Transpose", [dy], perm=pre + post + ind_axes)
    keep = r  # 1 + axis + (r - axis - 1)
    t = b.op("Reshape", [t, b.concat([b.shape(t, 0, keep) if ctx.opset >= 15 else
                                      b.op("Slice", [b.shape(t), b.ints([0]), b.ints([keep])]),
                                      b.ints([-1])])])
    out = b.op("MatMul", [t, onehot])  # [K, x[:axis], x[axis+1:], dim]
    perm = list(range(0, axis + 1)) + [r] + list(range(axis + 1, r))
    return b.op("Transpose", [out], perm=perm)


@rule("GatherElements", min_opset=16)
def gather_elements(ctx, node, dys):
    b = ctx.b
    x, ind = node.input
    axis = _norm(ctx.attr(node, "axis", 0), ctx.rank(x))
    picked = b.op("GatherElements", [index_tensor(ctx, x), ind], axis=axis)
    return [_scatter_back(ctx, x, picked, dys[0], add=True), None]


def _pad_opset(node) -> int:
    mode = attribute(node, "mode", default="constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return 16 if mode in ("reflect", "edge") else 0


@rule("Pad", min_opset=_pad_opset)
def pad(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    r = ctx.rank(x)
    mode = ctx.attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads: list[int] | None
    if ctx.opset < 11:
        pads = list(ctx.attr(node, "pads"))
    else:
        value = ctx.const(node.input[1])
        pads = [int(v) for v in value] if value is not None else None
    given = _axes_of(ctx, node, 3) if ctx.opset >= 18 else None
    axes = [_norm(a, r) for a in given] if given else list(range(r))
    n = len(axes)
    if pads is None and mode != "constant":
        raise ModelError(f"Pad node '{node.name}' has run-time pads in mode {mode}; not supported")
    if mode == "constant" and (pads is None or all(p >= 0 for p in pads)):
        # the gradient crops the cotangent; run-time pads (legacy exports compute them) are
        # assumed non-negative, as every exporter emits for padding
        starts = (b.op("Slice", [node.input[1], b.ints([0]), b.ints([n])]) if pads is None
                  else b.ints(pads[:n]))
        ends = b.op("Add", [starts, b.op("Gather", [b.shape(x), b.ints(axes)])])
        out = b.op("Slice", [dys[0], starts, ends, b.ints([a + 1 for a in axes])])
        return [out] + [None] * (len(node.input) - 1)
    if mode in ("reflect", "edge") and pads is not None and all(p >= 0 for p in pads):
        picked = b.op("Pad", [index_tensor(ctx, x)] + list(node.input[1:2]) + [""] +
                      (list(node.input[3:4]) if ctx.opset >= 18 else []), mode=mode)
        return [_scatter_back(ctx, x, picked, dys[0], add=True)] + [None] * (len(node.input) - 1)
    raise ModelError(f"Pad node '{node.name}' (mode {mode}, pads {pads}) is not supported")


@rule("Expand")
def expand(ctx, node, dys):
    return [ctx.unbroadcast(dys[0], node.input[0], node.output[0]), None]


@rule("Tile")
def tile(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    reps = ctx.const(node.input[1])
    r = ctx.rank(x)
    # the cotangent viewed as [K, rep0, d0, rep1, d1, ...], summed over the repeats
    if reps is not None:
        parts = [b.ints([-1])]
        for i, rep in enumerate(reps):
            parts += [b.ints([int(rep)]), b.shape(x, i, i + 1)]
        layout = b.concat(parts)
    else:  # run-time repeats: interleave them with shape(x) at run time
        pairs = b.op("Concat", [b.unsqueeze(node.input[1], [1]), b.unsqueeze(b.shape(x), [1])], axis=1)
        layout = b.concat([b.ints([-1]), b.op("Reshape", [pairs, b.ints([2 * r])])])
    split = b.op("Reshape", [dys[0], layout])
    summed = b.reduce("ReduceSum", split, [1 + 2 * i for i in range(r)], keepdims=False)
    return [summed, None]


# -- reductions ------------------------------------------------------------------------------

def _reduce_axes(ctx, node):
    """Normalised reduced axes of a Reduce* node (None: all axes)."""
    r = ctx.rank(node.input[0])
    axes = _axes_of(ctx, node, 1)
    if not axes:
        if ctx.attr(node, "noop_with_empty_axes", 0):
            return []
        return list(range(r))
    return sorted(_norm(a, r) for a in axes)


def _expand_back(ctx, node, dy, axes):
    """dy of the reduced result with the reduced axes kept: it broadcasts to [K] + shape(x)
    (rules multiply it by a tensor of x's shape, or mark it a partial cotangent)."""
    if not ctx.attr(node, "keepdims", 1) and axes:
        dy = ctx.b.unsqueeze(dy, [a + 1 for a in axes])
    return dy


def _count(ctx, x, axes):
    b = ctx.b
    sx = ctx.shape(x) or [None] * ctx.rank(x)
    dims = [sx[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        return ctx.scalar(float(np.prod(dims)) if dims else 1.0, x)
    picked = b.op("Gather", [b.shape(x), b.ints(axes)])
    return b.op("Cast", [b.reduce("ReduceProd", picked, [0], keepdims=False)], to=ctx.dtype(x))


def _output_keepdims(ctx, node, axes):
    """The reduction's output with the reduced axes kept (as keepdims=1 gives it)."""
    y = node.output[0]
    if not ctx.attr(node, "keepdims", 1) and axes:
        y = ctx.b.unsqueeze(y, axes)
    return y


@rule("ReduceSum")
def reduce_sum(ctx, node, dys):
    axes = _reduce_axes(ctx, node)
    return [ctx.b.broadcast_cot(_expand_back(ctx, node, dys[0], axes), node.input[0])] + [None] * (len(node.input) - 1)


@rule("ReduceMean")
def reduce_mean(ctx, node, dys):
    axes = _reduce_axes(ctx, node)
    dx = ctx.b.op("Div", [_expand_back(ctx, node, dys[0], axes), _count(ctx, node.input[0], axes)])
    return [ctx.b.broadcast_cot(dx, node.input[0])] + [None] * (len(node.input) - 1)


@rule("ReduceSumSquare")
def reduce_sum_square(ctx, node, dys):
    axes = _reduce_axes(ctx, node)
    x = node.input[0]
    dx = _expand_back(ctx, node, dys[0], axes)
    return [ctx.b.op("Mul", [dx, ctx.b.op("Mul", [x, ctx.scalar(2.0, x)])])] + [None] * (len(node.input) - 1)


@rule("ReduceL2")
def reduce_l2(ctx, node, dys):
    b = ctx.b
    axes = _reduce_axes(ctx, node)
    x, y = node.input[0], _output_keepdims(ctx, node, axes)
    dx = _expand_back(ctx, node, dys[0], axes)
    return [b.op("Mul", [dx, b.op("Div", [x, y])])] + [None] * (len(node.input) - 1)


@rule("ReduceMax", "ReduceMin")
def reduce_max(ctx, node, dys):
    b = ctx.b
    axes = _reduce_axes(ctx, node)
    x, y = node.input[0], _output_keepdims(ctx, node, axes)
    mask = b.op("Cast", [b.op("Equal", [x, y])], to=ctx.dtype(x))
    share = b.op("Div", [mask, b.reduce("ReduceSum", mask, axes, keepdims=True)])
    dx = _expand_back(ctx, node, dys[0], axes)
    return [b.op("Mul", [dx, share])] + [None] * (len(node.input) - 1)




@rule("GatherND", min_opset=16)
def gather_nd(ctx, node, dys):
    """Scatter-add the cotangent back to the picked positions (picks may repeat)."""
    b = ctx.b
    x, ind = node.input
    picked = b.op("GatherND", [index_tensor(ctx, x), ind], batch_dims=ctx.attr(node, "batch_dims", 0))
    return [_scatter_back(ctx, x, picked, dys[0], add=True), None]


@rule("DepthToSpace")
def depth_to_space(ctx, node, dys):
    """Undo the forward's reshape-transpose on the cotangent (K folded into N)."""
    b = ctx.b
    x, y = node.input[0], node.output[0]
    bs = int(ctx.attr(node, "blocksize"))
    mode = ctx.attr(node, "mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    c_out = b.shape(y, 1, 2)
    h, w = b.shape(x, 2, 3), b.shape(x, 3, 4)
    blk = b.ints([bs])
    t = b.op("Reshape", [dys[0], b.concat([b.ints([-1]), c_out, h, blk, w, blk])])  # [KN, C', H, b, W, b]
    # forward: DCR views x as [N, b, b, C', H, W] with perm [0,3,4,1,5,2]; CRD as
    # [N, C', b, b, H, W] with perm [0,1,4,2,5,3]. Apply the inverse permutations.
    inv = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    t = b.op("Transpose", [t], perm=inv)
    return [b.reshape_cot(t, x)]


@rule("SpaceToDepth")
def space_to_depth(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    bs = int(ctx.attr(node, "blocksize"))
    blk = b.ints([bs])
    # forward: [N, C, H', b, W', b] -perm [0,3,5,1,2,4]-> [N, b, b, C, H', W']
    t = b.op("Reshape", [dys[0], b.concat([b.ints([-1]), blk, blk, b.shape(x, 1, 2), b.shape(y, 2, 3),
                                           b.shape(y, 3, 4)])])
    t = b.op("Transpose", [t], perm=[0, 3, 4, 1, 5, 2])
    return [b.reshape_cot(t, x)]


@rule("ReduceL1")
def reduce_l1(ctx, node, dys):
    axes = _reduce_axes(ctx, node)
    x = node.input[0]
    dx = _expand_back(ctx, node, dys[0], axes)
    return [ctx.b.op("Mul", [dx, ctx.b.op("Sign", [x])])] + [None] * (len(node.input) - 1)


@rule("ReduceLogSumExp")
def reduce_log_sum_exp(ctx, node, dys):
    b = ctx.b
    axes = _reduce_axes(ctx, node)
    x, y = node.input[0], _output_keepdims(ctx, node, axes)
    dx = _expand_back(ctx, node, dys[0], axes)
    return [b.op("Mul", [dx, b.op("Exp", [b.op("Sub", [x, y])])])] + [None] * (len(node.input) - 1)


@rule("ReduceLogSum")
def reduce_log_sum(ctx, node, dys):
    """y = log(sum x): dx = dy / exp(y), a partial cotangent that broadcasts over the axes."""
    b = ctx.b
    axes = _reduce_axes(ctx, node)
    y = _output_keepdims(ctx, node, axes)
    dx = b.op("Div", [_expand_back(ctx, node, dys[0], axes), b.op("Exp", [y])])
    return [b.broadcast_cot(dx, node.input[0])] + [None] * (len(node.input) - 1)


@rule("CumSum")
def cum_sum(ctx, node, dys):
    """The adjoint of a running sum is the running sum the other way along the same axis."""
    x = node.input[0]
    axis = ctx.const(node.input[1])
    if axis is None:
        raise ModelError(f"CumSum node '{node.name}' has a run-time axis; only a constant axis is supported")
    axis = _norm(int(np.asarray(axis).reshape(-1)[0]), ctx.rank(x))
    dx = ctx.b.op("CumSum", [dys[0], ctx.b.ints([axis + 1])], exclusive=ctx.attr(node, "exclusive", 0),
                  reverse=1 - ctx.attr(node, "reverse", 0))
    return [dx, None]


@rule("Trilu")
def trilu(ctx, node, dys):
    """A mask of the last two axes: the cotangent gets the same mask."""
    ins = [dys[0]] + ([node.input[1]] if ctx.input(node, 1) else [])
    return [ctx.b.op("Trilu", ins, upper=ctx.attr(node, "upper", 1))] + [None] * (len(node.input) - 1)


@rule("ReduceProd")
def reduce_prod(ctx, node, dys):
    """d prod / dx_i = prod / x_i (inputs must be non-zero)."""
    b = ctx.b
    axes = _reduce_axes(ctx, node)
    x, y = node.input[0], _output_keepdims(ctx, node, axes)
    dx = _expand_back(ctx, node, dys[0], axes)
    return [b.op("Mul", [dx, b.op("Div", [y, x])])] + [None] * (len(node.input) - 1)


@rule("ScatterND")
def scatter_nd(ctx, node, dys):
    """y = data with the index tuples' slices replaced by (or, reduction add, increased by)
    updates. The seed axis goes last so the same indices address the cotangent: the data's
    cotangent is dy with those slices zeroed (kept, for add), the updates' is dy gathered there."""
    b = ctx.b
    data, ind, upd = node.input[:3]
    reduction = ctx.attr(node, "reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "add"):
        raise ModelError(f"ScatterND node '{node.name}' uses reduction {reduction}; only none and add "
                         f"are supported")
    r = ctx.rank(data)
    dyt = b.op("Transpose", [dys[0]], perm=list(range(1, r + 1)) + [0])
    picked = b.op("GatherND", [dyt, ind])
    d_upd = None
    if ctx.needs_grad(upd):
        ru = ctx.rank(upd)
        d_upd = b.op("Transpose", [picked], perm=[ru] + list(range(ru)))
    d_data = None
    if ctx.needs_grad(data):
        if reduction == "add":
            d_data = dys[0]
        else:
            zero = b.op("ConstantOfShape", [b.shape(picked)], value=filled(ctx.dtype(data), 0))
            d_data = b.op("Transpose", [b.op("ScatterND", [dyt, ind, zero])], perm=[r] + list(range(r)))
    return [d_data, None, d_upd]
