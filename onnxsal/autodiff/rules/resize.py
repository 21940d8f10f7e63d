"""Resize: linear in its input, so its backward multiplies the cotangent along each resized
axis by the transpose of the interpolation matrix.

Ops: Resize.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ...errors import ModelError
from .common import transpose_along
from .registry import rule


def _resize_matrix(node, opset: int, axis: int, rank: int, n_in: int, scale: float | None,
                   n_out: int, dtype) -> np.ndarray:
    """The [n_out, n_in] interpolation matrix of a Resize along one axis, obtained by resizing
    the identity with onnx's reference implementation (same attributes)."""
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator

    j0 = 0 if axis != 0 else 1
    shape = [1] * rank
    shape[j0], shape[axis] = n_in, n_in
    eye = np.eye(n_in, dtype=np.float64).reshape(shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = [numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    if scale is not None:
        sc = np.ones(rank, np.float32)
        sc[axis] = scale
        inits.append(numpy_helper.from_array(sc, "scales"))
        ins = ["x", "roi", "scales"]
    else:
        sz = np.asarray(shape, np.int64)
        sz[axis] = n_out
        inits.append(numpy_helper.from_array(sz, "sizes"))
        ins = ["x", "roi", "", "sizes"]
    g = helper.make_graph([helper.make_node("Resize", ins, ["y"], **attrs)], "r",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    (y,) = ReferenceEvaluator(m).run(None, {"x": eye})
    out = np.asarray(y)
    out = out.reshape([n_in, n_out] if j0 < axis else [n_out, n_in])
    mat = out.T if j0 < axis else out  # [n_out, n_in]
    return np.ascontiguousarray(mat).astype(dtype)


@rule("Resize")
def resize(ctx, node, dys):
    """Resize is linear in its input: per resized axis, multiply the cotangent by the transpose
    of the interpolation matrix (nearest, linear, cubic; any coordinate transformation).
    Needs static sizes on the resized axes and constant scales, or sizes that are constant or
    computed from shapes."""
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    bad = [a for a in ("axes",) if ctx.attr(node, a) is not None]
    ctm = ctx.attr(node, "coordinate_transformation_mode", "half_pixel")
    ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
    policy = ctx.attr(node, "keep_aspect_ratio_policy", "stretch")
    if bad or ctm == "tf_crop_and_resize" or policy not in ("stretch", b"stretch"):
        raise ModelError(f"{node.op_type} node '{node.name}' uses axes/crop/aspect-ratio options; not supported")
    scales = ctx.const(node.input[2]) if ctx.input(node, 2) else None
    if scales is not None and scales.size == 0:
        scales = None
    # sizes: constant, or computed from shapes (Concat(Shape(x)[:2], [H, W]) with a dynamic
    # batch is ['N', C, H, W]); run-time scales would move the sampling coordinates themselves
    sizes = ctx.shape_value(node.input[3]) if ctx.input(node, 3) else None
    if scales is None and sizes is None:
        raise ModelError(f"{node.op_type} node '{node.name}' has run-time scales/sizes; only constant "
                         f"scales and sizes computed from shapes are supported")
    sin, sout = ctx.shape(x) or [None] * r, list(ctx.shape(y) or [None] * r)
    np_t = helper.tensor_dtype_to_np_dtype(ctx.dtype(x))
    dx = dys[0]
    for i in range(r):
        sc = float(scales[i]) if scales is not None else None
        size = sizes[i] if sizes is not None else None  # sizes are given when scales are not
        if (sc is not None and sc == 1.0) or (sc is None and size is not None and size == sin[i]):
            continue
        if sc is None and isinstance(size, int):
            sout[i] = size
        if not isinstance(sin[i], int) or not isinstance(sout[i], int):
            raise ModelError(f"{node.op_type} node '{node.name}' resizes axis {i} of dynamic size; "
                             f"not supported")
        dx = transpose_along(ctx, dx, _resize_matrix(node, ctx.opset, i, r, sin[i], sc, sout[i], np_t), i, r)
    return [dx] + [None] * (len(node.input) - 1)
