"""Operators without a backward rule that ONNX itself defines as functions of other operators.

Two kinds of node are replaced by their definition before the pass differentiates a model:

* calls to the model's own functions (``model.functions``: exporters such as onnxscript may
  write a module as a function in a custom domain);
* standard operators that have no rule here but whose schema carries a function body for the
  model's opset (Attention, RMSNormalization and RotaryEmbedding from opset 23, Swish from 24,
  MeanVarianceNormalization, AffineGrid, ...): their bodies are made of operators that do.

Both go through onnx's own inliner (``onnx.inliner``), which renames the body's tensors and
binds attributes; nothing here interprets a function. Operators that have a rule keep their
node (LayerNormalization, Gelu, HardSwish, ... run faster fused and have exact rules).
"""

from __future__ import annotations

import copy

import onnx
import onnx.defs
import onnx.inliner
from onnx import helper

from ..errors import ModelError, first_line

STANDARD = ("", "ai.onnx")


def expandable(op_type: str, opset: int) -> bool:
    """Whether a standard operator has a function body at ``opset`` (plain or context-dependent)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:  # onnx.defs.SchemaError: not a standard operator at this opset
        return False
    # (onnx's type stubs omit these two properties of OpSchema)
    return bool(schema.has_function or schema.has_context_dependent_function)  # type: ignore[attr-defined]


def inline_local(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every call to one of its own functions inlined (recursively)."""
    if not len(model.functions):
        return model
    try:
        return onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # a recursive or malformed function: onnx says which
        raise ModelError(f"cannot inline the model's own functions: {first_line(exc)}") from None


def expand_standard(model: onnx.ModelProto, op_types: set[str]) -> onnx.ModelProto:
    """The model with the nodes of these standard operator types replaced by their bodies."""
    if not op_types:
        return model
    # context-dependent bodies are chosen by their inputs' types: the inliner reads them from
    # the graph's inputs and value_info, which need not list initializers
    typed = {vi.name for vi in list(model.graph.input) + list(model.graph.value_info)}
    model = copy.deepcopy(model)
    model.graph.value_info.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer if t.name not in typed)
    try:
        return onnx.inliner.inline_selected_functions(
            model, [(domain, op) for op in sorted(op_types) for domain in STANDARD],
            inline_schema_functions=True)
    except Exception as exc:  # onnx raises RuntimeError with the C++ assertion's text
        raise ModelError(f"cannot expand {', '.join(sorted(op_types))} into the function body "
                         f"that defines it: {first_line(exc)}") from None
