"""Convolution and pooling.

These operators insist on rank N+2, so the cotangent [K, N, C, ...] is folded to [K*N, C, ...]
and unfolded afterwards. Stride-1 input gradients run as a Conv with the spatially flipped
kernel (onnxruntime's CPU ConvTranspose is markedly slower); strided ones as ConvTranspose with
the output padding that restores the input's exact size.

Ops: AveragePool, Conv, ConvTranspose, GlobalAveragePool, GlobalMaxPool, MaxPool.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ...errors import ModelError
from .common import filled, index_tensor, transpose_along
from .registry import rule


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


SUBPIXEL_MAX_OUT_AREA = 4  # measured: ConvTranspose wins from 4x4 outputs up, loses below


def _subpixel_kernel(weight: np.ndarray, s: int, pb: list[int], sin: list[int], sout: list[int]):
    """A strided convolution's input gradient as one stride-1 Conv plus DepthToSpace.

    Input position i = q*s + r (phase r) receives dy[q + t] * w[k] for the taps k with
    r + pad - k = t*s. Stacking the s**d phases as output channels (c*s**d + phase, the
    DepthToSpace CRD order) gives one Conv over dy with kernel [Cin*s**d, Cout, T...].
    Returns (kernel, pads, Q) with Q the per-axis phase grid (Q*s >= the input size), or None.
    Group 1, dilation 1 only."""
    import itertools

    cout, cin = weight.shape[:2]
    d = weight.ndim - 2
    kernel = list(weight.shape[2:])
    axes = []
    for a in range(d):
        taps = []
        for r in range(s):
            taps.append([((r + pb[a] - k) // s, k) for k in range(kernel[a]) if (r + pb[a] - k) % s == 0])
        ts = [t for tl in taps for t, _ in tl]
        if not ts or min(ts) > 0:
            return None
        tmin, T = min(ts), max(ts) - min(ts) + 1
        Q = -(-sin[a] // s)
        axes.append((taps, tmin, T, -tmin, max(Q - 1 + T - sout[a] + tmin, 0), Q))
    S = s ** d
    V = np.zeros((cin, S, cout) + tuple(ax[2] for ax in axes), weight.dtype)
    wt = np.swapaxes(weight, 0, 1)  # [Cin, Cout, *k]
    for ph in itertools.product(range(s), repeat=d):
        pidx = int(np.ravel_multi_index(ph, (s,) * d)) if d else 0
        for combo in itertools.product(*[axes[a][0][ph[a]] for a in range(d)]):
            u = tuple(t - axes[a][1] for a, (t, _) in enumerate(combo))
            kk = tuple(k for _, k in combo)
            V[(slice(None), pidx, slice(None)) + u] = wt[(slice(None), slice(None)) + kk]
    V = V.reshape(cin * S, cout, *V.shape[3:])
    pads = [ax[3] for ax in axes] + [ax[4] for ax in axes]
    return V, pads, [ax[5] for ax in axes]


DENSE_MAX_RATIO = 1.5  # dense multiply-adds / the convolution's (valid taps only)
DENSE_MAX_ELEMS = 1 << 22  # largest dense matrix (16 MB in float32)


def _dense_conv_matrix(weight: np.ndarray, strides, dilations, pb, sin, sout, group: int):
    """The convolution on tiny planes as one dense matrix [Cout*prod(out), Cin*prod(in)], when
    that costs at most DENSE_MAX_RATIO times the multiply-adds of its valid taps (a 3x3
    convolution on a 2x2 or 1x1 plane: every tap pair is used anyway). Else None."""
    cout, cin_g = weight.shape[:2]
    d = len(sin)
    kernel = weight.shape[2:]
    cin, cout_g = cin_g * group, cout // group
    n_in, n_out = int(np.prod(sin)), int(np.prod(sout))
    dense = cout * n_out * cin * n_in
    if dense > DENSE_MAX_ELEMS:
        return None  # before enumerating taps: a large plane has millions of them
    hits = []
    for opos in np.ndindex(*sout):
        for kk in np.ndindex(*kernel):
            ipos = [opos[a] * strides[a] - pb[a] + kk[a] * dilations[a] for a in range(d)]
            if all(0 <= ipos[a] < sin[a] for a in range(d)):
                hits.append((int(np.ravel_multi_index(opos, sout)), int(np.ravel_multi_index(ipos, sin)), kk))
    if not hits or dense > DENSE_MAX_RATIO * len(hits) * cin_g * cout:
        return None
    M = np.zeros((cout, n_out, cin, n_in), weight.dtype)
    for oi, ii, kk in hits:
        for g in range(group):
            rows, cols = slice(g * cout_g, (g + 1) * cout_g), slice(g * cin_g, (g + 1) * cin_g)
            M[rows, oi, cols, ii] += weight[(rows, slice(None)) + kk]
    return M.reshape(cout * n_out, cin * n_in)


def _input_grad(ctx, dyf: str, weight, x: str, y: str, kernel, strides, dilations, pb, pe,
                group: int, wname: str | None = None) -> str:
    """The input gradient of a convolution for a folded cotangent dyf [K*N, Cout, *out].

    ``weight`` is a numpy array (a constant kernel) or the name of a weight tensor.
    Returns [K*N, Cin, *in].
    """
    b = ctx.b
    d = len(kernel)
    reach = [dilations[i] * (kernel[i] - 1) for i in range(d)]
    const_w = isinstance(weight, np.ndarray)
    sin = (ctx.shape(x) or [None] * (d + 2))[2:]
    sout = (ctx.shape(y) or [None] * (d + 2))[2:]
    static = all(isinstance(v, int) for v in list(sin) + list(sout))
    if const_w and static:
        # tiny planes (a 3x3 convolution on 2x2 or 1x1): one GEMM over all K*N images runs
        # 2-3x faster than onnxruntime's convolution kernels there (measured)
        dense = _dense_conv_matrix(weight, strides, dilations, pb, list(sin), list(sout), group)
        if dense is not None:
            flat = b.op("Reshape", [dyf, b.ints([-1, dense.shape[0]])])
            out = b.op("MatMul", [flat, b.const(dense, hint="wdense")])
            return b.op("Reshape", [out, b.ints([-1, weight.shape[1] * group] + list(sin))])
    if const_w and group == 1 and all(k == 1 for k in kernel) and all(s == 1 for s in strides) \
            and not any(pb + pe):
        # pointwise: one GEMM per image over the flattened plane, in NCHW; onnxruntime's NCHWc
        # convolution would add a reorder of the cotangent on each side (1.2-1.8x slower, measured)
        cout, cin = weight.shape[:2]
        flat = b.op("Reshape", [dyf, b.ints([0, cout, -1])])
        out = b.op("MatMul", [b.const(np.ascontiguousarray(weight.reshape(cout, cin).T), hint="wpoint"), flat])
        return b.op("Reshape", [out, b.concat([b.ints([0, cin]), b.shape(x, 2)])])
    within = all(0 <= pb[i] <= reach[i] and 0 <= pe[i] <= reach[i] for i in range(d))
    if all(s == 1 for s in strides) and const_w and within:
        cout, cin_g = weight.shape[:2]
        wg = weight.reshape(group, cout // group, cin_g, *weight.shape[2:])
        wg = np.swapaxes(wg, 1, 2).reshape(group * cin_g, cout // group, *weight.shape[2:])
        flipped = np.ascontiguousarray(wg[(slice(None), slice(None)) + (slice(None, None, -1),) * d])
        pads = [reach[i] - pb[i] for i in range(d)] + [reach[i] - pe[i] for i in range(d)]
        return b.op("Conv", [dyf, b.const(flipped, hint="wflip")], group=group, dilations=dilations,
                    pads=pads, strides=[1] * d, kernel_shape=list(kernel))
    if (const_w and static and group == 1 and d == 2 and all(v == 1 for v in dilations)
            and strides[0] == strides[1] > 1 and int(np.prod(sout)) <= SUBPIXEL_MAX_OUT_AREA):
        # tiny outputs: onnxruntime's ConvTranspose loops over the K*N images with small
        # GEMMs; a sub-pixel Conv runs them as one batch (2-2.6x faster, measured)
        plan = _subpixel_kernel(weight, strides[0], pb, list(sin), list(sout))
        if plan is not None:
            V, pads, Q = plan
            out = b.op("Conv", [dyf, b.const(V, hint="wsubpix")], pads=pads, strides=[1] * d,
                       kernel_shape=list(V.shape[2:]))
            out = b.op("DepthToSpace", [out], blocksize=strides[0], mode="CRD")
            if [q * strides[0] for q in Q] != list(sin):
                out = b.op("Slice", [out, b.ints([0] * d), b.ints(list(sin)), b.ints(list(range(2, 2 + d)))])
            return out
    w = wname or (b.const(weight, hint="w") if const_w else weight)
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


def _kernel(ctx, node, w: str):
    """(constant weight array or None, kernel shape) of a Conv/ConvTranspose whose weight
    carries no gradient."""
    if ctx.needs_grad(w):
        raise ModelError(f"{node.op_type} node '{node.name}' has a weight computed from the input; "
                         f"only constant kernels are supported")
    weight = ctx.const(w)
    wshape = list(weight.shape) if weight is not None else ctx.shape(w)
    return weight, list(ctx.attr(node, "kernel_shape", wshape[2:]))


@rule("Conv")
def conv(ctx, node, dys):
    x, w = node.input[0], node.input[1]
    y = node.output[0]
    weight, kernel = _kernel(ctx, node, w)
    strides, dilations, pb, pe = _geometry(ctx, node, x, kernel)
    group = ctx.attr(node, "group", 1)
    dyf = ctx.b.fold(dys[0], y)
    dxf = _input_grad(ctx, dyf, weight if weight is not None else w, x, y, kernel, strides,
                      dilations, pb, pe, group, wname=w)
    return [ctx.b.reshape_cot(dxf, x), None, None][: len(node.input)]


def _maxpool_overlaps(node) -> bool:
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = list(at.get("kernel_shape", []))
    s = list(at.get("strides", [1] * len(k)))
    d = list(at.get("dilations", [1] * len(k)))
    return any(d[i] * (k[i] - 1) + 1 > s[i] for i in range(len(k)))


def _maxpool_by_offsets(ctx, node, x, y, ind, dy):
    """MaxPool's gradient without a scatter-add (opsets 11..15, overlapping windows): for each
    kernel offset, keep the cotangent of the outputs whose argmax sits at that offset, and
    place all offsets at once with a ConvTranspose whose kernel is one-hot per offset."""
    import itertools

    b = ctx.b
    kernel = list(ctx.attr(node, "kernel_shape"))
    d = len(kernel)
    strides, dilations, pb, pe = _geometry(ctx, node, x, kernel)
    np_t = helper.tensor_dtype_to_np_dtype(ctx.dtype(x))
    idx = index_tensor(ctx, x)  # flat positions, as MaxPool's Indices count them
    extra = [strides[i] + pe[i] + dilations[i] * kernel[i] for i in range(d)]  # ceil_mode windows
    padded = b.op("Pad", [idx, b.ints([0, 0] + pb + [0, 0] + extra), b.const(np.asarray(-1, np.int64))])
    sy = b.shape(y, 2)
    span = b.op("Add", [b.op("Mul", [b.op("Sub", [sy, b.ints([1] * d)]), b.ints(strides)]), b.ints([1] * d)])
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    parts = []
    for off in offsets:
        start = [off[i] * dilations[i] for i in range(d)]
        pos = b.op("Slice", [padded, b.ints(start), b.op("Add", [span, b.ints(start)]),
                             b.ints(list(range(2, 2 + d))), b.ints(strides)])
        mask = b.op("Cast", [b.op("Equal", [ind, pos])], to=ctx.dtype(x))
        parts.append(b.unsqueeze(b.op("Mul", [dy, mask]), [3]))  # [K, N, C, 1, *out]
    stacked = b.op("Concat", parts, axis=3)
    stacked = b.op("Reshape", [stacked, b.concat([b.ints([-1, len(offsets)]), sy])])
    onehot = np.zeros([len(offsets), 1] + kernel, dtype=np_t)
    for o, off in enumerate(offsets):
        onehot[(o, 0) + tuple(off)] = 1
    placed = b.op("ConvTranspose", [stacked, b.const(onehot, hint="onehot")], strides=strides,
                  dilations=dilations, pads=pb + [0] * d, kernel_shape=kernel)
    # the placed plane may be shorter (floor mode leftovers) or longer (ceil mode) than x
    placed = b.op("Pad", [placed, b.ints([0] * (d + 2) + [0, 0] + [strides[i] + pe[i] for i in range(d)])])
    placed = b.op("Slice", [placed, b.ints([0] * d), b.shape(x, 2), b.ints(list(range(2, 2 + d)))])
    return b.reshape_cot(placed, x)


def _maxpool_opset(node) -> int:
    return 11


@rule("MaxPool", min_opset=_maxpool_opset)
def max_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    if ctx.attr(node, "storage_order", 0) != 0:
        raise ModelError(f"MaxPool node '{node.name}' uses storage_order=1, not supported")
    ind = ctx.ensure_output(node, 1, "maxpool_indices")
    overlap = _maxpool_overlaps(node)
    if overlap and ctx.opset < 16:
        return [_maxpool_by_offsets(ctx, node, x, y, ind, dys[0])]
    # Indices are flat positions in the whole input tensor: scatter-add each seed row's
    # cotangent there (overlapping windows send several values to one position).
    flat_dy = b.op("Reshape", [dys[0], b.concat([b.k_name, b.ints([-1])])])
    flat_ind = b.op("Reshape", [ind, b.ints([1, -1])])
    flat_ind = b.op("Expand", [flat_ind, b.concat([b.k_name, b.ints([1])])])
    size = b.op("Reshape", [b.op("Size", [x]), b.ints([1])])
    zero = b.op("ConstantOfShape", [b.concat([b.k_name, size])], value=filled(ctx.dtype(x), 0))
    kw = {"reduction": "add"} if overlap else {}
    scattered = b.op("ScatterElements", [zero, flat_ind, flat_dy], axis=1, **kw)
    return [b.reshape_cot(scattered, x)]


def _pool_matrix(k: int, stride: int, dilation: int, pad_begin: int, pad_end: int, include_pad: int,
                 n_in: int) -> np.ndarray:
    """[n_out, n_in]: the 1-D AveragePool with ceil_mode=1 applied to the identity, as
    onnxruntime computes it (divisors of windows that run past the input included)."""
    import onnxruntime as ort
    from onnx import TensorProto

    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[k], strides=[stride],
                            dilations=[dilation], pads=[pad_begin, pad_end], ceil_mode=1,
                            count_include_pad=include_pad)
    g = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_in, 1, n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.eye(n_in, dtype=np.float32).reshape(n_in, 1, n_in)})[0]
    return np.ascontiguousarray(out[:, 0, :].T)  # out[j, 0, o]: input j's weight in output o


@rule("AveragePool")
def average_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    kernel = list(ctx.attr(node, "kernel_shape"))
    d = len(kernel)
    strides, dilations, pb, pe = _geometry(ctx, node, x, kernel)
    include_pad = ctx.attr(node, "count_include_pad", 0)
    if ctx.attr(node, "ceil_mode", 0):
        sin = (ctx.shape(x) or [None] * (d + 2))[2:]
        sout = (ctx.shape(y) or [None] * (d + 2))[2:]
        floor_out = [((sin[i] + pb[i] + pe[i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1)
                     if isinstance(sin[i], int) else None for i in range(d)]
        if floor_out != list(sout):
            # the last windows run past the input, with divisors of their own: the pooling is
            # a separable linear map, each axis's matrix measured on onnxruntime's kernel
            if not all(isinstance(v, int) for v in list(sin) + list(sout)):
                raise ModelError(f"AveragePool node '{node.name}' with ceil_mode=1 on dynamic spatial "
                                 f"sizes; not supported")
            dx = dys[0]
            for i in range(d):
                mat = _pool_matrix(kernel[i], strides[i], dilations[i], pb[i], pe[i], include_pad, sin[i])
                dx = transpose_along(ctx, dx, mat.astype(helper.tensor_dtype_to_np_dtype(ctx.dtype(x))),
                                      i + 2, d + 2)
            return [dx]
    dyf = _fold_spatial(ctx, dys[0], y)
    ones = np.ones([1, 1] + kernel, dtype=helper.tensor_dtype_to_np_dtype(ctx.dtype(x)))
    if include_pad or not any(pb + pe):
        kern = ones / float(np.prod(kernel))
    else:
        # per-position divisor: the number of real (unpadded) inputs under each window
        plane = b.op("ConstantOfShape", [b.concat([b.ints([1, 1]), b.shape(x, 2)])],
                     value=filled(ctx.dtype(x), 1))
        counts = b.op("Conv", [plane, b.const(ones, hint="ones")], pads=pb + pe, strides=strides,
                      dilations=dilations, kernel_shape=kernel)
        dyf = b.op("Div", [dyf, counts])
        kern = ones
    xf = b.op("Reshape", [x, b.concat([b.ints([-1, 1]), b.shape(x, 2)])], hint="xplane")
    yf = b.op("Reshape", [y, b.concat([b.ints([-1, 1]), b.shape(y, 2)])], hint="yplane")
    ctx.declare(xf, [None, 1] + list((ctx.shape(x) or [None] * (d + 2))[2:]))
    ctx.declare(yf, [None, 1] + list((ctx.shape(y) or [None] * (d + 2))[2:]))
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
    return [b.broadcast_cot(b.op("Div", [dys[0], area]), x)]


@rule("GlobalMaxPool")
def global_max_pool(ctx, node, dys):
    b = ctx.b
    x, y = node.input[0], node.output[0]
    axes = list(range(2, ctx.rank(x)))
    mask = b.op("Cast", [b.op("Equal", [x, y])], to=ctx.dtype(x))
    share = b.op("Div", [mask, b.reduce("ReduceSum", mask, axes, keepdims=True)])
    return [b.op("Mul", [dys[0], share])]


@rule("ConvTranspose")
def conv_transpose(ctx, node, dys):
    """The adjoint of a transposed convolution is the convolution with the same weights,
    strides, pads, dilations and group (output_padding only adds rows the Conv ignores)."""
    b = ctx.b
    x, w = node.input[0], node.input[1]
    y = node.output[0]
    weight, kernel = _kernel(ctx, node, w)
    d = len(kernel)
    strides = list(ctx.attr(node, "strides", [1] * d))
    dilations = list(ctx.attr(node, "dilations", [1] * d))
    auto = ctx.attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", "") and ctx.attr(node, "output_shape") is None:
        p = list(ctx.attr(node, "pads", [0] * (2 * d)))
    elif auto == "VALID" and ctx.attr(node, "output_shape") is None:
        p = [0] * (2 * d)
    else:  # SAME_* or output_shape: the pads follow from the static sizes
        sin = (ctx.shape(x) or [None] * (d + 2))[2:]
        sout = (ctx.shape(y) or [None] * (d + 2))[2:]
        if not all(isinstance(v, int) for v in list(sin) + list(sout)):
            raise ModelError(f"ConvTranspose node '{node.name}' uses auto_pad/output_shape on dynamic "
                             f"sizes; re-export with explicit pads")
        op = list(ctx.attr(node, "output_padding", [0] * d))
        total = [strides[i] * (sin[i] - 1) + op[i] + dilations[i] * (kernel[i] - 1) + 1 - sout[i]
                 for i in range(d)]
        lower = auto == "SAME_LOWER"
        half = [int(t / 2) for t in total]  # C division (truncates): total < 0 with output_shape
        begin = [t - h if lower else h for t, h in zip(total, half)]
        p = begin + [t - bg for t, bg in zip(total, begin)]
    group = ctx.attr(node, "group", 1)
    wname = w  # the forward's own weight tensor (no copy)
    dyf = b.fold(dys[0], y)
    if any(v < 0 for v in p):  # output_shape asked for more than the kernel reaches: crop it
        cut = [-min(p[i], 0) for i in range(d)], [-min(p[d + i], 0) for i in range(d)]
        ends = b.op("Sub", [b.shape(y, 2), b.ints(cut[1])])
        dyf = b.op("Slice", [dyf, b.ints(cut[0]), ends, b.ints(list(range(2, 2 + d)))])
        p = [max(v, 0) for v in p]
    dxf = b.op("Conv", [dyf, wname], group=group, dilations=dilations, strides=strides, pads=p,
               kernel_shape=kernel)
    return [b.reshape_cot(dxf, x), None, None][: len(node.input)]
