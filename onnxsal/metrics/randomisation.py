"""Re-initialising the layers :func:`onnxsal.metrics.sanity.find_layers` finds, and the steps
of cascading and independent randomisation (docs/definitions.md#sanity-checks; the rules are
in the docstring of :mod:`onnxsal.metrics.sanity`). Inputs are never modified:
:func:`randomize` returns a new ``ModelProto``.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, OptionError
from .sanity import Layer, Operand, _Graph, find_layers


def _rng(seed: int, layer: str, tensor: str) -> np.random.Generator:
    h = hashlib.sha256(f"{layer}\x00{tensor}".encode()).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int.from_bytes(h[:8], "little")])


def _stored_dtype(model_g: _Graph, op: Operand) -> np.dtype:
    return np.asarray(model_g.constant_value(op.source)).dtype


def _new_value(layer: Layer, op: Operand, shape, dtype, seed: int) -> np.ndarray:
    if op.role == "bias":
        return np.zeros(shape, dtype=dtype)
    v = _rng(seed, layer.name, op.source).standard_normal(size=shape) * layer.std
    return v.astype(dtype)


def randomize(model: onnx.ModelProto, layers: Iterable[Layer | str], seed: int = 0,
              logits: str | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the given layers re-initialised (see the module docstring).

    ``layers`` are :class:`Layer` objects from :func:`find_layers` on this model, or their names.
    """
    if seed < 0:
        raise OptionError(f"seed must be >= 0, got {seed}")
    given = list(layers)
    known = {}
    if any(isinstance(L, str) for L in given):
        known = {L.name: L for L in find_layers(model, logits)}
        missing = [L for L in given if isinstance(L, str) and L not in known]
        if missing:
            raise OptionError(f"no learnable layer named {', '.join(map(repr, missing[:5]))}; "
                              f"layers: {', '.join(list(known)[:10])}{' ...' if len(known) > 10 else ''}")
    resolved = [known[L] if isinstance(L, str) else L for L in given]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(model)  # facts of the untouched input
    init_pos = {t.name: k for k, t in enumerate(out.graph.initializer)}
    taken = set(init_pos) | {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for layer in resolved:
        for op in layer.weights + layer.biases:
            node = out.graph.node[op.node_index]
            if node.input[op.input_index] != op.tensor:
                raise ModelError(f"layer '{layer.name}' does not match this model (was it found "
                                 f"on another model?)")
            dtype = _stored_dtype(g, op)
            if op.private:
                stored = g.constant_value(op.source)
                # draw in the shape the layer reads, stored back in the stored layout
                value = _new_value(layer, op, op.shape, dtype, seed)
                if stored is not None and value.size == stored.size:
                    value = value.reshape(stored.shape)
                tensor = numpy_helper.from_array(np.ascontiguousarray(value), op.source)
                if op.source_kind == "initializer":
                    out.graph.initializer[init_pos[op.source]].CopyFrom(tensor)
                else:
                    const = out.graph.node[g.producer[op.source]]
                    for a in const.attribute:
                        if a.name == "value":
                            a.t.CopyFrom(tensor)
            else:
                read_dtype = np.asarray(g.read_array(op.tensor)[0]).dtype
                value = _new_value(layer, op, op.shape, read_dtype, seed)
                base = f"{op.source}.onnxsal_random.{layer.name}"
                name, k = base, 1
                while name in taken:
                    name, k = f"{base}.{k}", k + 1
                taken.add(name)
                out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
                if out.ir_version and out.ir_version < 4:
                    out.graph.input.append(helper.make_tensor_value_info(
                        name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
                node.input[op.input_index] = name
    return out


def cascading_steps(layers: Sequence[Layer]) -> list[list[Layer]]:
    """Step i (1-based) randomises layers 1..i counted from the top."""
    return [list(layers[:i]) for i in range(1, len(layers) + 1)]


def independent_steps(layers: Sequence[Layer]) -> list[list[Layer]]:
    """Step i randomises layer i alone."""
    return [[L] for L in layers]


def pick_steps(n: int, max_steps: int | None) -> list[int]:
    """Indices (0-based) of at most ``max_steps`` of ``n`` steps, evenly spread, always
    including the first and the last."""
    if not max_steps or max_steps >= n:
        return list(range(n))
    if max_steps == 1:
        return [n - 1]
    idx = np.unique(np.round(np.linspace(0, n - 1, max_steps)).astype(int))
    return [int(i) for i in idx]


__all__ = ["randomize", "cascading_steps", "independent_steps", "pick_steps"]
