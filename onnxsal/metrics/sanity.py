"""Model-parameter randomisation of ONNX classifiers (Adebayo et al. 2018; docs/definitions.md#sanity-checks).

Working on the ONNX weights gives one randomisation rule for models from every framework.

* A *layer* is a node with learnable constants: Conv, ConvTranspose, Gemm, MatMul with a
  constant operand, and the affine parameters of BatchNormalization, LayerNormalization,
  InstanceNormalization and GroupNormalization. It is named after its node (``Op_<index>`` when
  the node has no name). Its data operand must depend on the image input (constant-folding
  leftovers are not layers).
* Layers are ordered top first by their graph distance from the logits, measured as the
  *longest* path (in nodes) to the node producing the logits. With the longest path a layer
  always comes after every layer downstream of it, so cascading randomisation never leaves a
  trained layer above a randomised one (shortest paths would, through residual skips).
* Randomising a layer re-draws its weights from a zero-mean normal with a fan-in scaled std:
  He, sqrt(2 / fan_in), when the layer is followed by a ReLU-like activation (Relu, LeakyRelu,
  PRelu, Clip with min 0), else Glorot, sqrt(2 / (fan_in + fan_out)). Its biases become 0.
  Normalisation scales count as weights with fan_in = fan_out = 1 (std 1, or sqrt(2) before a
  ReLU); batch-norm running mean and variance are kept (resetting them gives NaNs and is not
  what the paper did). A MatMul/Gemm/Conv without a bias input whose only consumer is an Add
  of a constant with one value per output feature gets that constant as its bias.
* Draws are seeded per (seed, layer, tensor), so a layer gets the same weights in every
  cascading step and in independent randomisation.
* Weights reached through Identity/Transpose/Reshape/Cast/Flatten/Squeeze/Unsqueeze nodes
  (dynamo exports) or held in Constant nodes are followed to the tensor that stores them; the
  fan-in is computed from the shape the layer reads. A stored tensor that is also read by
  anything else (tied or shared weights) is not changed: the layer gets a private random copy
  (a new initializer named ``<tensor>.onnxsal_random.<layer>``) and only its input is rewired,
  so the other readers stay trained.

This module finds the layers; :mod:`onnxsal.metrics.randomisation` re-draws them (a new
``ModelProto``: inputs are never modified) and lays out the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..autodiff.control_flow import effective_inputs
from ..errors import ModelError
from ..onnx_util import attribute

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
             "LayerNormalization", "InstanceNormalization", "GroupNormalization")
NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization")
# nodes that only move a stored weight around on its way to the layer that reads it
WEIGHT_CHAIN_OPS = ("Identity", "Transpose", "Reshape", "Cast", "Flatten", "Squeeze", "Unsqueeze")
# nodes looked through when deciding whether a layer is followed by a ReLU
_TRANSPARENT = ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
                "GroupNormalization", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze",
                "Unsqueeze", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool", "Cast")


@dataclass(frozen=True)
class Operand:
    """One stored tensor a layer reads: where it is read and where it is stored."""

    role: str  # "weight" or "bias"
    node_index: int  # the node that reads it (the layer, or its bias Add)
    input_index: int  # position in that node's inputs
    tensor: str  # the name the reading node uses
    source: str  # the initializer name, or the output name of the Constant node holding it
    source_kind: str  # "initializer" or "constant"
    private: bool  # nothing else reads the stored tensor: it is changed in place
    shape: tuple[int, ...]  # the shape the layer reads (after the weight chain)


@dataclass(frozen=True)
class Layer:
    """A learnable node; ``distance`` is the longest path (in nodes) to the logits' producer."""

    name: str
    op_type: str
    node_index: int
    distance: int
    weights: tuple[Operand, ...]
    biases: tuple[Operand, ...]
    fan_in: int
    fan_out: int
    init: str  # "he" or "glorot"

    @property
    def std(self) -> float:
        if self.init == "he":
            return math.sqrt(2.0 / max(self.fan_in, 1))
        return math.sqrt(2.0 / max(self.fan_in + self.fan_out, 1))

    @property
    def tensors(self) -> tuple[str, ...]:
        """The stored tensors this layer's randomisation touches."""
        return tuple(o.source for o in self.weights + self.biases)

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "distance": self.distance,
                "init": self.init, "std": self.std, "fan_in": self.fan_in, "fan_out": self.fan_out,
                "weights": [o.source for o in self.weights], "biases": [o.source for o in self.biases]}


# -- graph facts ------------------------------------------------------------------------------

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for t in effective_inputs(n):  # a subgraph's outer reads are reads of n
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.outputs = {o.name for o in g.output}
        # tensors that depend on a (non-initializer) graph input
        dyn = {vi.name for vi in g.input if vi.name not in self.inits}
        for n in self.nodes:
            if any(t in dyn for t in effective_inputs(n) if t):
                dyn.update(o for o in n.output if o)
        self.dynamic = dyn

    def n_readers(self, tensor: str) -> int:
        return len(self.consumers.get(tensor, [])) + (tensor in self.outputs)

    def constant_value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        p = self.producer.get(tensor)
        if p is not None and self.nodes[p].op_type == "Constant":
            return _constant_node_value(self.nodes[p])
        return None

    def resolve(self, tensor: str):
        """Follow a node input back through weight-chain nodes to its stored tensor:
        (source, kind, chain nodes from the source towards the reader) or None."""
        chain: list[int] = []
        t = tensor
        while True:
            if t in self.inits:
                return t, "initializer", chain[::-1]
            p = self.producer.get(t)
            if p is None:
                return None
            node = self.nodes[p]
            if node.op_type == "Constant":
                if _constant_node_value(node) is None:
                    return None
                return t, "constant", chain[::-1]
            if node.op_type in WEIGHT_CHAIN_OPS and node.input and node.input[0]:
                chain.append(p)
                t = node.input[0]
                continue
            return None

    def read_array(self, tensor: str):
        """The value a node input receives, if it is a stored constant (through the chain)."""
        r = self.resolve(tensor)
        if r is None:
            return None
        source, _, chain = r
        arr = self.constant_value(source)
        if arr is None:
            return None
        for p in chain:
            arr = _apply(self.nodes[p], arr, self)
            if arr is None:
                return None
        return arr, r

    def is_private(self, tensor: str, reader: int) -> bool:
        """Whether the stored tensor behind ``tensor`` reaches nothing but node ``reader``."""
        source, _, chain = self.resolve(tensor)
        path = [source] + [self.nodes[p].output[0] for p in chain]
        for i, t in enumerate(path):
            cons = self.consumers.get(t, [])
            expected = chain[i] if i < len(chain) else reader
            if t in self.outputs or len(cons) != 1 or cons[0] != expected:
                return False
        # the reader must read it once
        return list(self.nodes[reader].input).count(tensor) == 1


def _constant_node_value(node) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
    return None


def _apply(node, arr: np.ndarray, g: _Graph) -> np.ndarray | None:
    """Evaluate one weight-chain node on a constant (numpy), None when it cannot be done."""
    op = node.op_type
    if op == "Identity":
        return arr
    if op == "Cast":
        return arr.astype(helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if op == "Transpose":
        perm = attribute(node, "perm")
        return np.transpose(arr, perm if perm is not None else None)
    if op == "Flatten":
        axis = attribute(node, "axis", default=1)
        axis = axis + arr.ndim if axis < 0 else axis
        return arr.reshape(int(np.prod(arr.shape[:axis], dtype=np.int64)), -1)
    if op == "Reshape":
        if len(node.input) < 2:
            return None
        shape = g.constant_value(node.input[1])
        if shape is None:
            return None
        dims = [int(s) for s in shape.tolist()]
        if not attribute(node, "allowzero", default=0):
            dims = [arr.shape[i] if s == 0 else s for i, s in enumerate(dims)]
        return arr.reshape(dims)
    if op in ("Squeeze", "Unsqueeze"):
        return _squeeze(node, arr, g)
    return None


def _squeeze(node, arr: np.ndarray, g: _Graph) -> np.ndarray | None:
    """Squeeze or Unsqueeze on a constant (axes from the attribute or the second input)."""
    axes = attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = g.constant_value(node.input[1])
        if v is None:
            return None
        axes = [int(a) for a in np.ravel(v)]
    if node.op_type == "Squeeze":
        if axes is None:
            return np.squeeze(arr)
        return np.squeeze(arr, axis=tuple(a + arr.ndim if a < 0 else a for a in axes))
    if axes is None:
        return None
    rank = arr.ndim + len(axes)
    out = arr
    for a in sorted(a + rank if a < 0 else a for a in axes):
        out = np.expand_dims(out, a)
    return out


def _operand(g: _Graph, role: str, node_index: int, input_index: int) -> Operand | None:
    node = g.nodes[node_index]
    if input_index >= len(node.input) or not node.input[input_index]:
        return None
    tensor = node.input[input_index]
    got = g.read_array(tensor)
    if got is None:
        return None
    arr, (source, kind, _) = got
    if not np.issubdtype(np.asarray(arr).dtype, np.floating) and str(np.asarray(arr).dtype) != "bfloat16":
        return None
    return Operand(role, node_index, input_index, tensor, source, kind,
                   g.is_private(tensor, node_index), tuple(int(d) for d in np.shape(arr)))


def _follow_bias_add(g: _Graph, node_index: int, features: int) -> Operand | None:
    """The constant of an Add that is the layer's only consumer, with one value per feature."""
    out = g.nodes[node_index].output[0]
    cons = g.consumers.get(out, [])
    if len(cons) != 1 or out in g.outputs:
        return None
    add = g.nodes[cons[0]]
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    other = 1 if add.input[0] == out else 0
    if add.input[other] == out:
        return None
    op = _operand(g, "bias", cons[0], other)
    if op is None or int(np.prod(op.shape, dtype=np.int64)) != features:
        return None
    return op


def _relu_follows(g: _Graph, node_index: int, depth: int = 5) -> bool:
    frontier = [o for o in g.nodes[node_index].output if o]
    seen: set[int] = set()
    for _ in range(depth):
        nxt: list[str] = []
        for t in frontier:
            for c in g.consumers.get(t, []):
                if c in seen:
                    continue
                seen.add(c)
                n = g.nodes[c]
                if n.op_type in ("Relu", "LeakyRelu", "PRelu"):
                    return True
                if n.op_type == "Clip":
                    lo = attribute(n, "min")
                    if lo is None and len(n.input) > 1 and n.input[1]:
                        v = g.constant_value(n.input[1])
                        lo = None if v is None else float(np.ravel(v)[0])
                    if lo is not None and lo == 0.0:
                        return True
                    continue
                if n.op_type in _TRANSPARENT:
                    # an Add/Mul/... of two activations is a merge point: look no further
                    if n.op_type in ("Add", "Sub", "Mul", "Div") and \
                            sum(1 for i in n.input if i in g.dynamic) > 1:
                        continue
                    nxt.extend(o for o in n.output if o)
        frontier = nxt
    return False


def _distances(g: _Graph, logits: str) -> dict[int, int]:
    """Longest path (in nodes) from each node to the node producing ``logits``."""
    dist: dict[int, int] = {}
    for i in range(len(g.nodes) - 1, -1, -1):
        n = g.nodes[i]
        if logits in n.output:
            dist[i] = 0
            continue
        best = None
        for o in n.output:
            for c in g.consumers.get(o, []):
                if c in dist and (best is None or dist[c] + 1 > best):
                    best = dist[c] + 1
        if best is not None:
            dist[i] = best
    return dist


_Parts = tuple[list[Operand], list[Operand], int, int]  # weights, biases, fan-in, fan-out


def _bias(g: _Graph, i: int, features: int) -> Operand | None:
    """The bias input of node ``i``, or the constant Add that follows it."""
    n = g.nodes[i]
    return _operand(g, "bias", i, 2) if len(n.input) > 2 and n.input[2] else _follow_bias_add(g, i, features)


def _conv_parts(g: _Graph, i: int) -> _Parts | None:
    n = g.nodes[i]
    if not n.input or n.input[0] not in g.dynamic:
        return None
    w = _operand(g, "weight", i, 1)
    if w is None or len(w.shape) < 3:
        return None
    receptive = int(np.prod(w.shape[2:], dtype=np.int64))
    group = int(attribute(n, "group", default=1) or 1)
    if n.op_type == "Conv":
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        features = w.shape[0]
    else:
        fan_in, fan_out = max(w.shape[0] // group, 1) * receptive, w.shape[1] * receptive
        features = w.shape[1] * group
    b = _bias(g, i, features)
    return [w], [b] if b is not None else [], fan_in, fan_out


def _matmul_parts(g: _Graph, i: int) -> _Parts | None:
    n = g.nodes[i]
    cand = []
    for k in (1, 0):
        if len(n.input) > k and n.input[k] and n.input[k] not in g.dynamic:
            other = n.input[1 - k] if len(n.input) > 1 - k else ""
            if other in g.dynamic:
                cand.append(k)
    w = None
    for k in cand:
        w = _operand(g, "weight", i, k)
        if w is not None:
            break
    if w is None:
        return None
    shape = w.shape
    if n.op_type == "Gemm":
        trans = attribute(n, "transB" if w.input_index == 1 else "transA", default=0)
        eff = shape[::-1] if trans else shape  # B': [K, N]; A': [M, K]
        fan_in, fan_out = (eff[0], eff[1]) if w.input_index == 1 else (eff[1], eff[0])
        b = _bias(g, i, fan_out)
    else:
        if len(shape) == 1:
            fan_in, fan_out = shape[0], 1
        elif w.input_index == 1:
            fan_in, fan_out = shape[-2], shape[-1]
        else:
            fan_in, fan_out = shape[-1], shape[-2]
        b = _follow_bias_add(g, i, fan_out) if w.input_index == 1 else None
    return [w], [b] if b is not None else [], fan_in, fan_out


def _norm_parts(g: _Graph, i: int) -> _Parts | None:
    n = g.nodes[i]
    if not n.input or n.input[0] not in g.dynamic:
        return None
    s = _operand(g, "weight", i, 1)
    b = _operand(g, "bias", i, 2)
    if s is None and b is None:
        return None
    return [s] if s is not None else [], [b] if b is not None else [], 1, 1


def _layer_of(g: _Graph, i: int, distance: int, name: str) -> Layer | None:
    op = g.nodes[i].op_type
    if op in ("Conv", "ConvTranspose"):
        parts = _conv_parts(g, i)
    elif op in ("Gemm", "MatMul"):
        parts = _matmul_parts(g, i)
    elif op in NORM_OPS:
        parts = _norm_parts(g, i)
    else:
        return None
    if parts is None:
        return None
    weights, biases, fan_in, fan_out = parts
    init = "he" if _relu_follows(g, i) else "glorot"
    return Layer(name, op, i, distance, tuple(weights), tuple(biases), int(fan_in), int(fan_out), init)


def find_layers(model: onnx.ModelProto, logits: str | None = None) -> list[Layer]:
    """The learnable layers of ``model``, top (nearest the logits) first."""
    if logits is None:
        from ..model import find_logits

        logits = find_logits(model).tensor
    g = _Graph(model)
    dist = _distances(g, logits)
    if not dist:
        raise ModelError(f"no node produces the logits tensor '{logits}'")
    names: dict[str, int] = {}
    layers = []
    for i, n in enumerate(g.nodes):
        if n.op_type not in LAYER_OPS or n.domain not in ("", "ai.onnx") or i not in dist:
            continue
        base = n.name or f"{n.op_type}_{i}"
        k = names.get(base, 0)
        names[base] = k + 1
        name = base if k == 0 else f"{base}#{k}"
        layer = _layer_of(g, i, dist[i], name)
        if layer is not None:
            layers.append(layer)
    layers.sort(key=lambda L: (L.distance, -L.node_index))
    return layers


__all__ = ["Layer", "Operand", "LAYER_OPS", "find_layers"]
