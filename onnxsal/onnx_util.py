"""Small ONNX helpers used across onnxsal and the converters.

Attributes with the schema's defaults, graph indexes (producers, consumers, constants), fresh
tensor names, the IR version onnxruntime reads, and a quiet CPU onnxruntime session for probes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import onnx
from onnx import helper

#: onnxruntime >= 1.18 reads IR 10, which carries opset 21; onnx >= 1.23 would write 14 otherwise
MAX_IR_VERSION = 10


# -- IR version ---------------------------------------------------------------------------------

def ir_version_for(model: onnx.ModelProto) -> int:
    """The model's IR version capped at :data:`MAX_IR_VERSION` (the cap when unset), raised to
    what its opsets need."""
    need = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION), need)


def set_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a model built or edited here an IR version onnxruntime reads (docs/data.md#version-traps)."""
    model.ir_version = ir_version_for(model)
    return model


# -- attributes ---------------------------------------------------------------------------------

def opset_of(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The opset version the model imports for ``domain`` ("" and "ai.onnx" are the same)."""
    same = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    return next((o.version for o in model.opset_import if o.domain in same), None)


def attributes(node: onnx.NodeProto, opset: int | None = None) -> dict[str, Any]:
    """The node's attributes as Python values; with ``opset``, the ones it leaves out are
    filled in with the operator schema's defaults (attributes without a default stay absent)."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if opset is None:
        return values
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return values
    for name, attr in schema.attributes.items():
        if name not in values and attr.default_value.type != onnx.AttributeProto.UNDEFINED:
            values[name] = helper.get_attribute_value(attr.default_value)
    return values


def attribute(node: onnx.NodeProto, name: str, opset: int | None = None, default: Any = None) -> Any:
    """One attribute's value (see :func:`attributes`), or ``default`` when it has none."""
    return attributes(node, opset).get(name, default)


# -- graph indexes ------------------------------------------------------------------------------

def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node that writes each tensor of ``graph`` (its own nodes, not its subgraphs')."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor of ``graph``, in graph order (a node once per input slot:
    ``Mul(x, x)`` counts twice)."""
    index: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in (i for i in n.input if i):
            index.setdefault(i, []).append(n)
    return index


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The tensors whose values the graph states: initializers and Constant nodes' ``value``."""
    found = {t.name: t for t in graph.initializer}
    found.update({n.output[0]: a.t for n in graph.node
                  if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output
                  for a in n.attribute if a.name == "value"})
    return found


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of a control-flow node (If branches, Loop and Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in the graph and its subgraphs (a fresh name must not shadow one)."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
    names |= {t.values.name for t in graph.sparse_initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
        for g in subgraphs(n):
            names |= all_names(g)
    names.discard("")
    return names


def name_allocator(taken: set[str], prefix: str) -> Callable[[str], str]:
    """``fresh(hint)``: a new name ``<prefix><hint>_<k>`` not in ``taken`` (which it extends)."""
    counter = 0

    def fresh(hint: str) -> str:
        nonlocal counter
        counter += 1
        name = f"{prefix}{hint}_{counter}"
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    return fresh


# -- onnxruntime --------------------------------------------------------------------------------

def quiet_options(threads: int | None = None):
    """onnxruntime session options that log only fatal errors (onnxsal reports errors itself),
    with ``threads`` intra-op threads when given."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def cpu_session(model: onnx.ModelProto | bytes | str | os.PathLike, threads: int | None = None,
                options=None):
    """A quiet onnxruntime session on the CPU (for probes, parity checks and benchmarks)."""
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    return ort.InferenceSession(src, options or quiet_options(threads), providers=["CPUExecutionProvider"])


__all__ = ["MAX_IR_VERSION", "ir_version_for", "set_ir_version", "opset_of", "attributes", "attribute",
           "producers", "consumers", "constants", "subgraphs", "all_names", "name_allocator",
           "quiet_options", "cpu_session"]
