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
