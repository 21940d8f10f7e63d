"""Convolution and pooling.

These operators insist on rank N+2, so the cotangent [K, N, C, ...] is folded to [K*N, C, ...]
and unfolded afterwards. Stride-1 input gradients run as a Conv with the spatially flipped
kernel (onnxruntime's CPU ConvTranspose is markedly slower); strided ones as ConvTranspose with
the output padding that restores the input's exact size.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ...errors import ModelError
from .registry import rule


def _filled(elem_type: int, value: float):
    """The `value` attribute of a ConstantOfShape."""
    return helper.make_tensor("value", elem_type, [1], [value])


def _pads(ctx, node, x: str, kernel: list[int], strides: list[int], dilations: list[int]):
    """Explicit (begin, end) pads, turning auto_pad SAME_* into numbers from static shapes."""
    d = len(kernel)
    auto = ctx.attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = list(ctx.attr(node, "pads", [0] * (2 * d)))
        return p[:d], p[d:]
    if auto == "VALID":
        return [0] * d, [0] * d
    spatial = (ctx.shape(x) or [None] * (d + 2))[2:]
    begin, end = [], []
    for i in range(d):
        if all(s == 1 for s in (strides[i],)):
            total = dilations[i] * (kernel[i] - 1)
        else:
            size = spatial[i]
            if not isinstance(size, int):
                raise ModelError(f"{node.op_type} node '{node.name}' uses auto_pad={auto} with stride "
                                 f"{strides[i]} on a dynamic input size; re-export with explicit pads")
            total = max((math.ceil(size / strides[i]) - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _geometry(ctx, node, x: str, kernel: list[int]):
    d = len(kernel)
    strides = list(ctx.attr(node, "strides", [1] * d))
    dilations = list(ctx.attr(node, "dilations", [1] * d))
    pb, pe = _pads(ctx, node, x, kernel, strides, dilations)
    return strides, dilations, pb, pe


def _input_grad(ctx, dyf: str, weight, x: str, y: str, kernel, strides, dilations, pb, pe,
                group: int) -> str:
    """The input gradient of a convolution for a folded cotangent dyf [K*N, Cout, *out].

    ``weight`` is a numpy array (a constant kernel) or the name of a weight tensor.
    Returns [K*N, Cin, *in].
    """
    b = ctx.b
    d = len(kernel)
    reach = [dilations[i] * (kernel[i] - 1) for i in range(d)]
    const_w = isinstance(weight, np.ndarray)
    if all(s == 1 for s in strides) and const_w and all(0 <= pb[i] <= reach[i] and 0 <= pe[i] <= reach[i] for i in range(d)):
        cout, cin_g = weight.shape[:2]
        wg = weight.reshape(group, cout // group, cin_g, *weight.shape[2:])
        wg = np.swapaxes(wg, 1, 2).reshape(group * cin_g, cout // group, *weight.shape[2:])
        flipped = np.ascontiguousarray(wg[(slice(None), slice(None)) + (slice(None, None, -1),) * d])
        pads = [reach[i] - pb[i] for i in range(d)] + [reach[i] - pe[i] for i in range(d)]
        return b.op("Conv", [dyf, b.const(flipped, hint="wflip")], group=group, dilations=dilations,
                    pads=pads, strides=[1] * d, kernel_shape=list(kernel))
    w = b.const(weight, hint="w") if const_w else weight
    sin = (ctx.shape(x) or [None] * (d + 2))[2:]
    sout = (ctx.shape(y) or [None] * (d + 2))[2:]
    if all(isinstance(v, int) for v in list(sin) + list(sout)):
        op = [sin[i] - ((sout[i] - 1) * strides[i] - pb[i] - pe[i] + reach[i] + 1) for i in range(d)]
        if all(0 <= o < max(strides[i], dilations[i]) for i, o in enumerate(op)):
            return b.op("ConvTranspose", [dyf, w], group=group, dilations=dilations, strides=strides,
                        pads=pb + pe, output_padding=op, kernel_shape=list(kernel))
    # dynamic sizes: over-produce by the largest output padding, then crop to the input's size
    op = [max(strides[i], dilations[i]) - 1 for i in range(d)]
    full = b.op("ConvTranspose", [dyf, w], group=group, dilations=dilations, strides=strides,
                pads=pb + pe, output_padding=op, kernel_shape=list(kernel))
    axes = list(range(2, 2 + d))
    return b.op("Slice", [full, b.ints([0] * d), b.shape(x, 2), b.ints(axes)])


def _fold_spatial(ctx, dy: str, y: str) -> str:
    """[K, N, C, *s] -> [K*N*C, 1, *s] (pooling acts per channel)."""
    b = ctx.b
    return b.op("Reshape", [dy, b.concat([b.ints([-1, 1]), b.shape(y, 2)])], hint="foldc")


@rule("Conv")
def conv(ctx, node, dys):
    x, w = node.input[0], node.input[1]
    y = node.output[0]
    if ctx.needs_grad(w):
        raise ModelError(f"Conv node '{node.name}' has a weight computed from the input; only "
                         f"constant kernels are supported")
    weight = ctx.const(w)
    wshape = list(weight.shape) if weight is not None else ctx.shape(w)
    kernel = list(ctx.attr(node, "kernel_shape", wshape[2:]))
    strides, dilations, pb, pe = _geometry(ctx, node, x, kernel)
    group = ctx.attr(node, "group", 1)
    dyf = ctx.b.fold(dys[0], y)
    dxf = _input_grad(ctx, dyf, weight if weight is not None else w, x, y, kernel, strides,
                      dilations, pb, pe, group)
    return [ctx.b.reshape_cot(dxf, x), None, None][: len(node.input)]


@rule("MaxPool", min_opset=16)
def max_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    if ctx.attr(node, "storage_order", 0) != 0:
        raise ModelError(f"MaxPool node '{node.name}' uses storage_order=1, not supported")
    ind = ctx.ensure_output(node, 1, "maxpool_indices")
    # Indices are flat positions in the whole input tensor: scatter-add each seed row's
    # cotangent there (overlapping windows send several values to one position).
    flat_dy = b.op("Reshape", [dys[0], b.concat([b.k_name, b.ints([-1])])])
    flat_ind = b.op("Reshape", [ind, b.ints([1, -1])])
    flat_ind = b.op("Expand", [flat_ind, b.concat([b.k_name, b.ints([1])])])
    size = b.op("Reshape", [b.op("Size", [x]), b.ints([1])])
    zero = b.op("ConstantOfShape", [b.concat([b.k_name, size])], value=_filled(ctx.dtype(x), 0))
    scattered = b.op("ScatterElements", [zero, flat_ind, flat_dy], axis=1, reduction="add")
    return [b.reshape_cot(scattered, x)]


@rule("AveragePool")
def average_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    kernel = list(ctx.attr(node, "kernel_shape"))
    d = len(kernel)
    strides, dilations, pb, pe = _geometry(ctx, node, x, kernel)
    if ctx.attr(node, "ceil_mode", 0):
        sin = (ctx.shape(x) or [None] * (d + 2))[2:]
        sout = (ctx.shape(y) or [None] * (d + 2))[2:]
        floor_out = [((sin[i] + pb[i] + pe[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1)
                     if isinstance(sin[i], int) else None for i in range(d)]
        if floor_out != list(sout):
            raise ModelError(f"AveragePool node '{node.name}' with ceil_mode=1 changes the output "
                             f"size; not supported")
    include_pad = ctx.attr(node, "count_include_pad", 0)
    dyf = _fold_spatial(ctx, dys[0], y)
    ones = np.ones([1, 1] + kernel, dtype=np.float32)
    if include_pad or not any(pb + pe):
        kern = ones / float(np.prod(kernel))
    else:
        # per-position divisor: the number of real (unpadded) inputs under each window
        plane = b.op("ConstantOfShape", [b.concat([b.ints([1, 1]), b.shape(x, 2)])],
                     value=_filled(ctx.dtype(x), 1))
        counts = b.op("Conv", [plane, b.const(ones, hint="ones")], pads=pb + pe, strides=strides,
                      dilations=dilations, kernel_shape=kernel)
        dyf = b.op("Div", [dyf, counts])
        kern = ones
    xf = b.op("Reshape", [x, b.concat([b.ints([-1, 1]), b.shape(x, 2)])], hint="xplane")
    yf = b.op("Reshape", [y, b.concat([b.ints([-1, 1]), b.shape(y, 2)])], hint="yplane")
    ctx._shapes[xf] = [None, 1] + list((ctx.shape(x) or [None] * (d + 2))[2:])
    ctx._shapes[yf] = [None, 1] + list((ctx.shape(y) or [None] * (d + 2))[2:])
    dxf = _input_grad(ctx, dyf, kern, xf, yf, kernel, strides, dilations, pb, pe, 1)
    return [b.reshape_cot(dxf, x)]


@rule("GlobalAveragePool")
def global_average_pool(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    spatial = (ctx.shape(x) or [])[2:]
    if spatial and all(isinstance(s, int) for s in spatial):
        area = ctx.scalar(float(np.prod(spatial)), x)
    else:
        area = b.op("Cast", [b.reduce("ReduceProd", b.shape(x, 2), [0], keepdims=True)], to=ctx.dtype(x))
    scaled = b.op("Div", [dys[0], area])
    return [b.op("Expand", [scaled, b.concat([b.ints([1]), b.shape(x)])])]


@rule("GlobalMaxPool")
def global_max_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    axes = list(range(2, ctx.rank(x)))
    mask = b.op("Cast", [b.op("Equal", [x, y])], to=ctx.dtype(x))
    share = b.op("Div", [mask, b.reduce("ReduceSum", mask, axes, keepdims=True)])
    return [b.op("Mul", [dys[0], share])]
