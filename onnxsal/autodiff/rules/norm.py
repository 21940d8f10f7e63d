"""Normalisation and softmax: BatchNormalization (inference), LayerNormalization,
InstanceNormalization, Softmax and LogSoftmax.

Statistics that the forward node may not expose (mean, inverse std) are recomputed from the
saved input rather than read from optional outputs.

Ops: BatchNormalization, GroupNormalization, InstanceNormalization, LRN, LayerNormalization,
LogSoftmax, LpNormalization, Softmax.
"""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import ModelError
from .registry import rule


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@rule("BatchNormalization")
def batch_norm(ctx, node, dys):
    b = ctx.b
    x, scale, _, _, var = node.input[:5]
    if ctx.attr(node, "training_mode", 0):
        raise ModelError(f"BatchNormalization node '{node.name}' is in training mode; export the "
                         f"model in eval mode")
    if any(ctx.needs_grad(t) for t in (scale, var)):
        raise ModelError(f"BatchNormalization node '{node.name}' has statistics computed from the "
                         f"input; not supported")
    eps = ctx.attr(node, "epsilon", 1e-5)
    r = ctx.rank(x)
    sc, vr = ctx.const(scale), ctx.const(var)
    if sc is not None and vr is not None:
        factor = (sc.astype(np.float64) / np.sqrt(vr.astype(np.float64) + eps)).astype(sc.dtype)
        f = b.const(factor.reshape([-1] + [1] * (r - 2)), hint="bnf")
    else:
        f = b.op("Div", [scale, b.op("Sqrt", [b.op("Add", [var, ctx.scalar(eps, x)])])])
        f = b.op("Reshape", [f, b.ints([-1] + [1] * (r - 2))])
    return [b.op("Mul", [dys[0], f]), None, None, None, None]


def _normalize_backward(ctx, dy, x, g_scale, axes_x, eps):
    """dx of y = (x - mean) * rstd * g_scale over axes_x (x's own axis numbers)."""
    b = ctx.b
    mu = b.reduce("ReduceMean", x, axes_x, keepdims=True)
    xc = b.op("Sub", [x, mu])
    var = b.reduce("ReduceMean", b.op("Mul", [xc, xc]), axes_x, keepdims=True)
    rstd = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, ctx.scalar(eps, x)])])])
    xhat = b.op("Mul", [xc, rstd])
    g = b.op("Mul", [dy, g_scale]) if g_scale is not None else dy
    axes_k = [a + 1 for a in axes_x]
    mg = b.reduce("ReduceMean", g, axes_k, keepdims=True)
    mgx = b.reduce("ReduceMean", b.op("Mul", [g, xhat]), axes_k, keepdims=True)
    inner = b.op("Sub", [b.op("Sub", [g, mg]), b.op("Mul", [xhat, mgx])])
    return b.op("Mul", [inner, rstd]), xhat


@rule("LayerNormalization")
def layer_norm(ctx, node, dys):
    b = ctx.b
    x, scale = node.input[0], node.input[1]
    bias = ctx.input(node, 2)
    r = ctx.rank(x)
    axis = _norm_axis(ctx.attr(node, "axis", -1), r)
    eps = ctx.attr(node, "epsilon", 1e-5)
    axes = list(range(axis, r))
    dx, xhat = _normalize_backward(ctx, dys[0], x, scale, axes, eps)
    out = [dx, None, None][: len(node.input)]
    y = node.output[0]
    if ctx.needs_grad(scale):
        out[1] = ctx.unbroadcast(b.op("Mul", [dys[0], xhat]), scale, y)
    if bias is not None and ctx.needs_grad(bias):
        out[2] = ctx.unbroadcast(dys[0], bias, y)
    return out


@rule("InstanceNormalization")
def instance_norm(ctx, node, dys):
    b = ctx.b
    x, scale = node.input[0], node.input[1]
    r = ctx.rank(x)
    eps = ctx.attr(node, "epsilon", 1e-5)
    if ctx.needs_grad(scale):
        raise ModelError(f"InstanceNormalization node '{node.name}' with a computed scale is not supported")
    s = b.op("Reshape", [scale, b.ints([-1] + [1] * (r - 2))])
    dx, _ = _normalize_backward(ctx, dys[0], x, s, list(range(2, r)), eps)
    return [dx, None, None]


@rule("Softmax")
def softmax(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    axes = _softmax_axes(ctx, node, r)
    s = b.reduce("ReduceSum", b.op("Mul", [dys[0], y]), [a + 1 for a in axes], keepdims=True)
    return [b.op("Mul", [y, b.op("Sub", [dys[0], s])])]


@rule("LogSoftmax")
def log_softmax(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    axes = _softmax_axes(ctx, node, r)
    s = b.reduce("ReduceSum", dys[0], [a + 1 for a in axes], keepdims=True)
    return [b.op("Sub", [dys[0], b.op("Mul", [b.op("Exp", [y]), s])])]


def _softmax_axes(ctx, node, r):
    if ctx.opset >= 13:
        return [_norm_axis(ctx.attr(node, "axis", -1), r)]
    # before opset 13 the input is flattened to 2-D at `axis`
    return list(range(_norm_axis(ctx.attr(node, "axis", 1), r), r))


@rule("GroupNormalization")
def group_norm(ctx, node, dys):
    """Normalise over (channels of a group, spatial) per sample; the affine part is per
    channel from opset 21 (per group in opset 18)."""
    b = ctx.b
    x, scale = node.input[0], node.input[1]
    if any(ctx.needs_grad(t) for t in node.input[1:] if t):
        raise ModelError(f"GroupNormalization node '{node.name}' with computed scale/bias is not supported")
    r = ctx.rank(x)
    groups = int(ctx.attr(node, "num_groups"))
    eps = ctx.attr(node, "epsilon", 1e-5)
    dy = dys[0]
    if ctx.opset >= 21:  # per-channel scale: apply before grouping
        dy = b.op("Mul", [dy, b.op("Reshape", [scale, b.ints([-1] + [1] * (r - 2))])])
    xg = b.op("Reshape", [x, b.concat([b.shape(x, 0, 1), b.ints([groups, -1])])])  # [N, G, rest]
    ctx.declare(xg, [None, groups, None], ctx.dtype(x))
    dyg = b.op("Reshape", [dy, b.concat([b.k_name, b.shape(x, 0, 1), b.ints([groups, -1])])])
    g_scale = None
    if ctx.opset < 21:
        g_scale = b.op("Reshape", [scale, b.ints([groups, 1])])
    dxg, _ = _normalize_backward(ctx, dyg, xg, g_scale, [2], eps)
    return [b.reshape_cot(dxg, x), None, None]


@rule("LpNormalization")
def lp_normalization(ctx, node, dys):
    """y = x / ||x||_p along the axis (p = 1 or 2): dx = (dy - g sum(dy y)) / ||x||_p, with
    g = d||x||/dx = y for p = 2 and sign(x) for p = 1."""
    b = ctx.b
    x, y = node.input[0], node.output[0]
    p = ctx.attr(node, "p", 2)
    if p not in (1, 2):
        raise ModelError(f"LpNormalization node '{node.name}' has p={p}; ONNX allows only 1 and 2")
    axis = _norm_axis(ctx.attr(node, "axis", -1), ctx.rank(x))
    norm = b.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=True)
    g = y if p == 2 else b.op("Sign", [x])
    s = b.reduce("ReduceSum", b.op("Mul", [dys[0], y]), [axis + 1], keepdims=True)
    return [b.op("Div", [b.op("Sub", [dys[0], b.op("Mul", [g, s])]), norm])]


def _channel_window_sum(ctx, t, size: int, before: int, after: int, like: str):
    """sum over channels c - before .. c + after of t ([B, C, spatial...], zero outside)."""
    b = ctx.b
    r = ctx.rank(like)
    ones = b.const(np.ones([1, 1, size] + [1] * (r - 2)),
                   dtype=onnx.helper.tensor_dtype_to_np_dtype(ctx.dtype(like)), hint="window")
    pads = [before] + [0] * (r - 2) + [after] + [0] * (r - 2)
    return b.squeeze(b.op("Conv", [b.unsqueeze(t, [1]), ones], pads=pads), [1])


@rule("LRN")
def lrn(ctx, node, dys):
    """y = x s^-beta, s = bias + alpha/size * (sum of x^2 over a window of channels):
    dx = dy s^-beta - (2 alpha beta / size) x W'(dy y / s), where W' sums over the transposed
    window (the channels whose window holds c). AlexNet, CaffeNet, GoogLeNet in the ONNX zoo."""
    b = ctx.b
    x, y = node.input[0], node.output[0]
    size = int(ctx.attr(node, "size"))
    alpha, beta, bias = ctx.attr(node, "alpha", 1e-4), ctx.attr(node, "beta", 0.75), ctx.attr(node, "bias", 1.0)
    lo, hi = (size - 1) // 2, size // 2  # floor and ceil of (size - 1) / 2
    sq = _channel_window_sum(ctx, b.op("Mul", [x, x]), size, lo, hi, x)
    s = b.op("Add", [ctx.scalar(bias, x), b.op("Mul", [sq, ctx.scalar(alpha / size, x)])])
    direct = b.op("Mul", [dys[0], b.op("Pow", [s, ctx.scalar(-beta, x)])])
    back = b.fold(b.op("Mul", [dys[0], b.op("Div", [y, s])]), y)
    cross = b.reshape_cot(_channel_window_sum(ctx, back, size, hi, lo, x), x)
    cross = b.op("Mul", [cross, b.op("Mul", [x, ctx.scalar(2 * alpha * beta / size, x)])])
    return [b.op("Sub", [direct, cross])]

