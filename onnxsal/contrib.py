"""onnxruntime's fused operators (domain com.microsoft) written back as standard ONNX.

A model saved after onnxruntime's graph optimizations (``optimized_model_filepath`` at the
extended level, as some vendors ship them) holds FusedConv (Conv + Add + activation), BiasGelu,
QuickGelu, FastGelu, Gelu, FusedMatMul and SkipLayerNormalization. Each is replaced by the
standard nodes it fuses, with the same arithmetic, so the pass differentiates them with the
standard rules (onnxruntime fuses them again when the session is built). The NCHWc layout
operators of the full optimization level (com.microsoft.nchwc) stay unsupported: save such a
model at the extended level or below.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError

DOMAIN = "com.microsoft"


class _Lowering:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {t for n in g.node for t in list(n.input) + list(n.output)} | \
            {i.name for i in g.initializer} | {i.name for i in g.input}
        self.inits: list = []
        self.elem, self.rank = {}, {}  # tensor -> elem type (for constants), rank
        try:  # (a saved optimized model's value_info is partial)
            g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:
            pass
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self.elem[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.tensor_type.HasField("shape"):
                self.rank[vi.name] = len(vi.type.tensor_type.shape.dim)
        for t in g.initializer:
            self.elem[t.name] = t.data_type
            self.rank[t.name] = len(t.dims)

    def fresh(self, hint: str) -> str:
        k = 0
        while f"onnxsal_ms_{hint}_{k}" in self.taken:
            k += 1
        name = f"onnxsal_ms_{hint}_{k}"
        self.taken.add(name)
        return name

    def const(self, value: float, like: str) -> str:
        dtype = helper.tensor_dtype_to_np_dtype(self.elem.get(like) or onnx.TensorProto.FLOAT)
        name = self.fresh("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def _activation(lw, kind: str, params, x: str, y: str) -> list:
    """Nodes computing y = kind(x) for the activations onnxruntime fuses into Conv and Gemm."""
    params = list(params or [])
    if kind == "Relu":
        return [helper.make_node("Relu", [x], [y])]
    if kind in ("Tanh", "Sigmoid"):
        return [helper.make_node(kind, [x], [y])]
    if kind == "LeakyRelu":
        return [helper.make_node("LeakyRelu", [x], [y], alpha=params[0] if params else 0.01)]
    if kind == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return [helper.make_node("HardSigmoid", [x], [y], alpha=alpha, beta=beta)]
    if kind == "Clip":
        lo, hi = (params + [-math.inf, math.inf][len(params):])[:2]
        return [helper.make_node("Clip", [x, lw.const(lo, x), lw.const(hi, x)], [y])]
    raise ModelError(f"fused activation '{kind}' is not one onnxsal knows")


def _gelu_erf(lw, x: str, y: str) -> list:
    """y = x * 0.5 * (1 + erf(x / sqrt 2)), as exporters write it (one element-wise region)."""
    t = [lw.fresh("gelu") for _ in range(4)]
    return [helper.make_node("Mul", [x, lw.const(1 / math.sqrt(2), x)], [t[0]]),
            helper.make_node("Erf", [t[0]], [t[1]]),
            helper.make_node("Add", [t[1], lw.const(1.0, x)], [t[2]]),
            helper.make_node("Mul", [x, lw.const(0.5, x)], [t[3]]),
            helper.make_node("Mul", [t[3], t[2]], [y])]


def _fused_conv(lw, node, a: dict, ins: list) -> list | None:
    conv_attrs = {k: v for k, v in a.items() if k not in ("activation", "activation_params")}
    c = lw.fresh("conv")
    nodes = [helper.make_node("Conv", ins[:3], [c], **conv_attrs)]
    if len(ins) > 3 and ins[3]:  # the fused "sum" input Z
        s = lw.fresh("sum")
        nodes.append(helper.make_node("Add", [c, ins[3]], [s]))
        c = s
    kind = _text(a.get("activation"))
    if not kind:
        return nodes + [helper.make_node("Identity", [c], [node.output[0]])]
    return nodes + _activation(lw, kind, a.get("activation_params"), c, node.output[0])


def _gelu(lw, node, a: dict, ins: list) -> list | None:
    x = ins[0]
    if node.op_type == "BiasGelu" or (len(ins) > 1 and ins[1]):
        x = lw.fresh("biased")
        pre = [helper.make_node("Add", ins[:2], [x])]
    else:
        pre = []
    return pre + _gelu_erf(lw, x, node.output[0])


def _fast_gelu(lw, node, a: dict, ins: list) -> list | None:  # tanh approximation, optional bias
    x, pre = ins[0], []
    if len(ins) > 1 and ins[1]:
        x = lw.fresh("biased")
        pre = [helper.make_node("Add", ins[:2], [x])]
    t = [lw.fresh("fastgelu") for _ in range(8)]
    return pre + [
        helper.make_node("Mul", [x, x], [t[0]]),
        helper.make_node("Mul", [t[0], lw.const(0.044715, x)], [t[1]]),
        helper.make_node("Add", [t[1], lw.const(1.0, x)], [t[2]]),
        helper.make_node("Mul", [x, t[2]], [t[3]]),
        helper.make_node("Mul", [t[3], lw.const(math.sqrt(2 / math.pi), x)], [t[4]]),
        helper.make_node("Tanh", [t[4]], [t[5]]),
        helper.make_node("Add", [t[5], lw.const(1.0, x)], [t[6]]),
        helper.make_node("Mul", [x, lw.const(0.5, x)], [t[7]]),
        helper.make_node("Mul", [t[7], t[6]], [node.output[0]])]


def _quick_gelu(lw, node, a: dict, ins: list) -> list | None:  # x * sigmoid(alpha x)
    x = ins[0]
    t = [lw.fresh("quickgelu") for _ in range(2)]
    return [helper.make_node("Mul", [x, lw.const(a.get("alpha", 1.702), x)], [t[0]]),
            helper.make_node("Sigmoid", [t[0]], [t[1]]),
            helper.make_node("Mul", [x, t[1]], [node.output[0]])]


def _fused_matmul(lw, node, a: dict, ins: list) -> list | None:
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        return None
    nodes, mats = [], []
    for name, trans in ((ins[0], a.get("transA", 0)), (ins[1], a.get("transB", 0))):
        if trans:
            r = lw.rank.get(name)
            if r is None or r < 2:
                return None
            t = lw.fresh("trans")
            nodes.append(helper.make_node("Transpose", [name], [t], perm=list(range(r - 2)) + [r - 1, r - 2]))
            name = t
        mats.append(name)
    alpha = a.get("alpha", 1.0)
    if alpha == 1.0:
        return nodes + [helper.make_node("MatMul", mats, [node.output[0]])]
    m = lw.fresh("mm")
    return nodes + [helper.make_node("MatMul", mats, [m]),
                    helper.make_node("Mul", [m, lw.const(alpha, ins[0])], [node.output[0]])]


def _skip_layer_norm(lw, node, a: dict, ins: list) -> list | None:
    outs = list(node.output) + [""] * 4
    if outs[1] or outs[2]:
        return None  # mean / inverse std asked for: not written back
    s1 = lw.fresh("skip")
    nodes = [helper.make_node("Add", ins[:2], [s1])]
    if len(ins) > 4 and ins[4]:
        s2 = lw.fresh("skipbias")
        nodes.append(helper.make_node("Add", [s1, ins[4]], [s2]))
        s1 = s2
    ln_in = [s1, ins[2]] + ([ins[3]] if len(ins) > 3 and ins[3] else [])
    nodes.append(helper.make_node("LayerNormalization", ln_in, [outs[0]], axis=-1,
                                  epsilon=a.get("epsilon", 1e-5)))
    if outs[3]:
        nodes.append(helper.make_node("Identity", [s1], [outs[3]]))
    return nodes

LOWERINGS = {"FusedConv": _fused_conv, "Gelu": _gelu, "BiasGelu": _gelu, "FastGelu": _fast_gelu,
             "QuickGelu": _quick_gelu, "FusedMatMul": _fused_matmul, "SkipLayerNormalization": _skip_layer_norm}
LOWERED = frozenset(LOWERINGS)  # the com.microsoft operators written back as standard ONNX


def _lower(lw, node) -> list | None:
    """Standard nodes computing the fused node, or None when it is not written back."""
    fn = LOWERINGS.get(node.op_type)
    return fn(lw, node, _attrs(node), list(node.input)) if fn is not None else None


def lower(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with onnxruntime's fused operators written as standard ONNX (a copy when any
    is found; the model itself otherwise). Unknown com.microsoft operators are left for the
    pass to report."""
    if not any(n.domain == DOMAIN for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for _ in range(3):  # ranks behind a fused node are known once it is lowered
        lw = _Lowering(model)
        out, changed = [], False
        for node in g.node:
            new = _lower(lw, node) if node.domain == DOMAIN else None
            out.extend(new if new is not None else [node])
            changed |= new is not None
        del g.node[:]
        g.node.extend(out)
        g.initializer.extend(lw.inits)
        if not changed:
            break
    if not any(n.domain == DOMAIN for n in g.node):
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model
