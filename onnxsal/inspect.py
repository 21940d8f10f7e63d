"""The model summary of ``onnxsal inspect``: a file's roles, operators, and how the gradient
pass treats them (kept apart from :mod:`onnxsal.model` so that loading a model does not import
the pass)."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

import onnx
from onnx import TensorProto

from .autodiff import supported_ops
from .autodiff.control_flow import walk
from .autodiff.expand import expandable, inline_local
from .autodiff.prepare import default_opset
from .contrib import DOMAIN as ORT_DOMAIN
from .contrib import lower
from .model import NO_GRADIENT_OPS, InputSpec, LogitsSpec, find_image_input, find_logits, parameter_count, type_name
from .trust import carries_gradient, plan, without_own_gradient


@dataclass
class ModelSummary:
    path: str | None
    input: InputSpec
    logits: LogitsSpec
    opset: int
    ir_version: int
    parameters: int
    producer: str
    operators: dict = field(default_factory=dict)  # op type -> {"count": n, "differentiable": bool}
    notes: list = field(default_factory=list)  # how the gradient pass treats this file
    gradients: str = ""  # whose gradients onnxsal uses (onnxsal.trust.plan)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input"]["elem_type"] = type_name(self.input.elem_type)
        return d


def summarize(model: onnx.ModelProto, path: str | None = None, output: str | None = None,
              rules: str = "default") -> ModelSummary:
    """What ``onnxsal inspect`` prints: input, logits, opset, operators and whether the pass
    differentiates each, and notes on how the gradients of this file are taken."""
    supported = set(supported_ops(rules))
    own = carries_gradient(model)
    model = without_own_gradient(model, output)  # what onnxsal differentiates (onnxsal.trust)
    notes = _pass_notes(model)
    model = lower(inline_local(model))  # the operators the pass meets
    opset = default_opset(model)
    notes += [f"{op} has no rule: expanded into the function body ONNX defines it by"
              for op in sorted({n.op_type for n in walk(model.graph.node) if n.domain in ("", "ai.onnx")
                                and n.op_type not in supported and expandable(n.op_type, opset)})]
    counts = collections.Counter(  # with the nodes inside If, Loop and Scan bodies
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in walk(model.graph.node))
    ops = {op: {"count": c, "differentiable": op in supported or expandable(op, opset),
                "needs_rule": op not in NO_GRADIENT_OPS} for op, c in sorted(counts.items())}
    return ModelSummary(
        path=path,
        input=find_image_input(model),
        logits=find_logits(model, output),
        opset=opset,
        ir_version=model.ir_version,
        parameters=parameter_count(model),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        operators=ops,
        notes=notes,
        gradients=plan(own, all(v["differentiable"] or not v["needs_rule"] for v in ops.values())),
    )


def _pass_notes(model: onnx.ModelProto) -> list[str]:
    """What an auditor should know about how the gradients of this file are taken."""
    ops = collections.Counter((n.domain, n.op_type) for n in model.graph.node)
    notes = []
    if any(i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in model.graph.input):
        notes.append("float16 model: the gradients are those of its float16 arithmetic (returned as float32)")
    if ops[("", "QuantizeLinear")] and ops[("", "DequantizeLinear")]:
        notes.append("quantized (QDQ): gradients by the straight-through estimator (rounding counts as the "
                     "identity inside the integer range, zero where values are clipped)")
    fused = sorted(op for (dom, op) in ops if dom == ORT_DOMAIN)
    if fused:
        notes.append(f"onnxruntime's fused operators written back as standard ONNX: {', '.join(fused)}")
    if len(model.functions):
        notes.append(f"{len(model.functions)} model-local function(s) inlined")
    return notes
