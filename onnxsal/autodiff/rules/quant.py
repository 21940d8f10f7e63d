"""Quantized models in QDQ form: QuantizeLinear -> (int tensor) -> DequantizeLinear.

Rounding has a zero derivative almost everywhere, so the true gradient of a quantized model
is zero. onnxsal takes the straight-through estimator instead, as quantization-aware training
does (PyTorch's fake_quantize backward): QuantizeLinear passes the cotangent where
round(x / scale) + zero_point lies inside the integer range and stops it where the value is
clipped; DequantizeLinear scales it. A pair with one scale is the identity inside the range.

The pass lets a QuantizeLinear's integer output carry a cotangent (a float tensor of the same
shape); weights dequantized from constants are folded to constants before the rules run.

Ops: DequantizeLinear, QuantizeLinear.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...errors import ModelError
from .registry import rule

# integer range of each quantized type (saturating casts; the 4-bit types included)
RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
          TensorProto.INT16: (-32768, 32767), TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7)}


def _per_axis(ctx, node, name: str, like: str) -> str:
    """A scale or zero point as a float tensor that broadcasts against ``like`` (per-tensor
    scalars as they are, per-axis vectors reshaped onto the node's axis)."""
    value = ctx.const(name)
    if value is None:
        raise ModelError(f"{node.op_type} node '{node.name}' has a run-time scale or zero point "
                         f"(dynamic quantization); only constant ones are supported")
    if ctx.attr(node, "block_size", 0):
        raise ModelError(f"{node.op_type} node '{node.name}' uses blocked quantization; not supported")
    value = np.asarray(value, helper.tensor_dtype_to_np_dtype(ctx.dtype(like)))
    if value.ndim == 1 and value.size > 1:
        r = ctx.rank(like)
        axis = ctx.attr(node, "axis", 1)
        axis = axis + r if axis < 0 else axis
        value = value.reshape([-1] + [1] * (r - 1 - axis))
    return ctx.b.const(value, hint="qparam")


@rule("QuantizeLinear")
def quantize_linear(ctx, node, dys):
    b = ctx.b
    x = node.input[0]
    scale = _per_axis(ctx, node, node.input[1], x)
    zp_name = ctx.input(node, 2)
    qtype = ctx.dtype(zp_name) if zp_name else ctx.attr(node, "output_dtype", TensorProto.UINT8) or TensorProto.UINT8
    if qtype not in RANGES:
        raise ModelError(f"QuantizeLinear node '{node.name}' quantizes to "
                         f"{TensorProto.DataType.Name(qtype)}; only integer types are supported")
    lo, hi = RANGES[qtype]
    level = b.op("Round", [b.op("Div", [x, scale])])
    if zp_name:
        level = b.op("Add", [level, _per_axis(ctx, node, zp_name, x)])
    # (level holds whole numbers: Greater than lo - 0.5 is >= lo, in every opset)
    inside = b.op("And", [b.op("Greater", [level, ctx.scalar(lo - 0.5, x)]),
                          b.op("Less", [level, ctx.scalar(hi + 0.5, x)])])
    slope = b.op("Div", [b.op("Cast", [inside], to=ctx.dtype(x)), scale])
    return [b.op("Mul", [dys[0], slope])] + [None] * (len(node.input) - 1)


@rule("DequantizeLinear")
def dequantize_linear(ctx, node, dys):
    y = node.output[0]
    producer = ctx.producer(node.input[0])
    if producer is None or producer.op_type != "QuantizeLinear":
        raise ModelError(f"DequantizeLinear node '{node.name}' reads an integer tensor that no "
                         f"QuantizeLinear computes from the input; not differentiable")
    return [ctx.b.op("Mul", [dys[0], _per_axis(ctx, node, node.input[1], y)])] + [None] * (len(node.input) - 1)
