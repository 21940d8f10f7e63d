"""A small node builder for the backward graph: fresh names, typed constants, and the
opset-aware helpers (reductions, squeezes, dynamic shapes) that the rules share.

Shapes are kept dynamic: every target shape is computed at run time from ``Shape`` nodes,
never copied from the shapes recorded at export, so one augmented model runs at any batch
size and any number of seed rows K.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, overload

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max

# Static dimension: an int, a symbolic name (str), or None (unknown).
Dim = int | str | None


class Builder:
    """Emits nodes and initializers into lists that the pass appends to the graph."""

    def __init__(self, opset: int, taken: set[str], prefix: str = "osal"):
        self.opset = opset
        self.taken = taken
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.dtypes: dict[str, int] = {}  # elem type of tensors this builder created
        self._count = 0
        self._const_cache: dict[tuple, str] = {}
        self._shape_cache: dict[tuple, str] = {}
        self.k_name = ""  # [1] int64 tensor holding K, set by the pass
        # cotangents left in a broadcastable shape (size-1 axes where the tensor has more):
        # name -> the forward tensor whose [K] + shape they stand for. The pass adds them to
        # full-size terms by Sum's broadcasting and expands them only when nothing else comes.
        self.partial: dict[str, str] = {}
        # cotangents that are a zero Pad of `src` along one axis: name -> (src, axis, start,
        # stop, size). Terms that tile the axis are joined by one Concat instead of a Sum of
        # padded copies (q, k, v taken from one projection; a class token and the rest).
        self.placed: dict[str, tuple[str, int, int, int, int]] = {}

    def child(self) -> "Builder":
        """A builder for a subgraph's nodes (a backward If branch): the same names, seed axis,
        initializers and constants; a shape cache seeded with this one's, whose tensors the
        subgraph sees, but not the other way round."""
        b = Builder(self.opset, self.taken, self.prefix)
        b.k_name, b.initializers = self.k_name, self.initializers
        b.dtypes, b._const_cache = self.dtypes, self._const_cache
        b._shape_cache = dict(self._shape_cache)
        return b

    # -- names and raw nodes -------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        hint = "".join(c if c.isalnum() or c in "_." else "_" for c in hint)[-40:]
        while True:
            self._count += 1
            name = f"{self.prefix}_{hint}_{self._count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    @overload
    def op(self, op_type: str, inputs: Sequence[str], n_out: Literal[1] = 1, hint: str | None = None,
           **attrs: Any) -> str: ...

    @overload
    def op(self, op_type: str, inputs: Sequence[str], n_out: int, hint: str | None = None,
           **attrs: Any) -> list[str]: ...

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, hint: str | None = None,
           **attrs: Any) -> str | list[str]:
        """Append one node and return its output name (or names when n_out > 1)."""
        outs = [self.fresh(hint or op_type) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    # -- constants -----------------------------------------------------------------------
    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 16:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._const_cache:
                return self._const_cache[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.dtypes[name] = helper.np_dtype_to_tensor_dtype(arr.dtype)
        if key is not None:
            self._const_cache[key] = name
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="i")

    def scalar(self, value: float, elem_type: int = TensorProto.FLOAT) -> str:
        return self.const(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem_type)), hint="s")

    # -- shapes --------------------------------------------------------------------------
    def shape(self, x: str, start: int = 0, end: int | None = None) -> str:
        """Shape(x)[start:end] as a 1-D int64 tensor (cached)."""
        key = (x, start, end)
        if key in self._shape_cache:
            return self._shape_cache[key]
        if start == 0 and end is None:
            out = self.op("Shape", [x], hint="shape")
        elif self.opset >= 15:
            out = self.op("Shape", [x], hint="shape", start=start, end=end)
        else:
            full = self.shape(x)
            out = self.op("Slice", [full, self.ints([start]), self.ints([INT64_MAX if end is None else end])],
                          hint="shape")
        self._shape_cache[key] = out
        return out

    def concat(self, parts: Sequence[str], axis: int = 0) -> str:
        if len(parts) == 1:
            return parts[0]
        return self.op("Concat", list(parts), axis=axis)

    def k_shape(self, x: str) -> str:
        """[K] + shape(x): the shape of x's cotangent."""
        return self.concat([self.k_name, self.shape(x)])

    def reshape_cot(self, t: str, x: str) -> str:
        """Reshape t to [K] + shape(x) (K inferred as -1)."""
        return self.op("Reshape", [t, self.concat([self.ints([-1]), self.shape(x)])], hint="cot")

    def fold(self, dy: str, y: str) -> str:
        """[K, N, rest...] -> [K*N, rest...] where y is the forward tensor of shape [N, rest...]."""
        return self.op("Reshape", [dy, self.concat([self.ints([-1]), self.shape(y, 1)])], hint="fold")

    def broadcast_cot(self, t: str, x: str) -> str:
        """Mark t ([K] + shape(x) with some axes 1) as x's cotangent, expanded lazily."""
        self.partial[t] = x
        return t

    def place(self, src: str, rank: int, axis: int, start: int, stop: int, size: int) -> str:
        """src (a cotangent of rank ``rank`` with stop - start entries on axis ``axis``)
        zero-padded to ``size`` entries there, at [start, stop)."""
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = start, size - stop
        out = self.op("Pad", [src, self.ints(pads)])
        self.placed[out] = (src, axis, start, stop, size)
        return out

    def _tiled(self, terms: Sequence[str]) -> str | None:
        """One Concat of the placed terms' sources when they tile their axis exactly."""
        if len(terms) < 2 or not all(t in self.placed for t in terms):
            return None
        parts = sorted((self.placed[t] for t in terms), key=lambda p: p[2])
        axis, size = parts[0][1], parts[0][4]
        edge = 0
        for _src, ax, start, stop, sz in parts:
            if ax != axis or sz != size or start != edge:
                return None
            edge = stop
        return self.op("Concat", [p[0] for p in parts], axis=axis) if edge == size else None

    def accumulate(self, terms: Sequence[str], x: str) -> str:
        """The cotangent of x from its terms: one Sum (which broadcasts the partial terms),
        expanded to [K] + shape(x) only when every term is partial; one Concat when the terms
        are zero-padded slices that tile an axis."""
        tiled = self._tiled(terms)
        if tiled is not None:
            return tiled
        total = self.add_all(terms)
        if all(t in self.partial for t in terms):
            total = self.op("Expand", [total, self.concat([self.ints([1]), self.shape(x)])])
        return total

    def zeros_cot(self, x: str, elem_type: int = TensorProto.FLOAT) -> str:
        zero = helper.make_tensor("value", elem_type, [1], [0])
        return self.op("ConstantOfShape", [self.k_shape(x)], hint="zeros", value=zero)

    # -- opset-aware operators -----------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        """ReduceSum/Mean/Max... over static axes (an input from opset 13 or 18, else an
        attribute); axes only the run knows: see broadcast._split_sum."""
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes)])
        return self.op("Squeeze", [x], axes=list(axes))

    def add_all(self, terms: Sequence[str]) -> str:
        if len(terms) == 1:
            return terms[0]
        return self.op("Sum", list(terms), hint="acc")
