"""Helpers that several rule families share (one place, so the families import none of each
other's code)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


def filled(elem_type: int, value: float) -> TensorProto:
    """The `value` attribute of a ConstantOfShape."""
    return helper.make_tensor("value", elem_type, [1], [value])


def index_tensor(ctx, x: str) -> str:
    """An int64 tensor shaped like x whose elements are their own flat positions."""
    b = ctx.b
    size = b.op("Size", [x])
    flat = b.op("Range", [b.const(np.asarray(0, np.int64)), size, b.const(np.asarray(1, np.int64))])
    return b.op("Reshape", [flat, b.shape(x)], hint="flatidx")


def transpose_along(ctx, dy: str, mat: np.ndarray, i: int, r: int) -> str:
    """The cotangent [K] + shape(y) multiplied along forward axis i by the transpose of the
    [n_out, n_in] matrix of a linear map applied along that axis (Resize, pooling)."""
    b = ctx.b
    if i == r - 1:
        return b.op("MatMul", [dy, b.const(mat, hint="axismapT")])
    if i == r - 2:
        return b.op("MatMul", [b.const(np.ascontiguousarray(mat.T), hint="axismapT"), dy])
    perm = [a for a in range(r + 1) if a != i + 1] + [i + 1]  # axis i (i+1 with K) last, and back
    inv = [perm.index(a) for a in range(r + 1)]
    t = b.op("MatMul", [b.op("Transpose", [dy], perm=perm), b.const(mat, hint="axismapT")])
    return b.op("Transpose", [t], perm=inv)
