"""Simplify a model before the gradient pass with onnxruntime's basic graph optimizations.

The basic level only rewrites standard ONNX into standard ONNX (constant folding, removal of
redundant nodes, folding zero Pad, BatchNormalization, Mul and Add into the neighbouring Conv),
so the backward graph gets fewer and cheaper nodes: on EfficientNet-Lite0 the 456 exported
nodes become 98, and shape computations that exporters leave to run time become constants.
Tensors the caller names (Grad-CAM layers, say) are kept as outputs so they survive.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import onnx

from .errors import ModelError, first_line
from .onnx_util import cpu_session, quiet_options

MAX_SIMPLIFY_BYTES = 1 << 30  # larger models go to the pass unsimplified


def simplify(model: onnx.ModelProto, keep: Sequence[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` after onnxruntime's basic optimizations, standard domain only."""
    import onnxruntime as ort

    if model.ByteSize() > MAX_SIMPLIFY_BYTES:
        return model
    m = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = [o.name for o in m.graph.output]
    produced = {t for n in m.graph.node for t in n.output}
    for name in keep:
        if name not in outputs and name in produced:  # unknown names are the pass's to report
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        so = quiet_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = path
        try:
            cpu_session(m, options=so)
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        out = onnx.load(path)
    finally:
        os.unlink(path)
    if any(n.domain not in ("", "ai.onnx") for n in out.graph.node):
        return model  # the optimizer used a contrib op: keep the original
    used = {n.domain for n in out.graph.node} | {""}
    kept = [o for o in out.opset_import if o.domain in used or (o.domain == "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    # drop the extra outputs again unless they were outputs before
    extra = [o for o in out.graph.output if o.name not in outputs and o.name not in keep]
    for o in extra:
        out.graph.output.remove(o)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out
