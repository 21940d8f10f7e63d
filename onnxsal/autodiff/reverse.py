"""The reverse pass over a prepared model: the seed input, the walk (:meth:`.Context.walk`),
the accumulated cotangents of the wrt tensors, and the new outputs and roles."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import ModelError, OptionError
from ..model import find_image_input, find_logits
from . import control_flow
from .context import Context
from .contract import META_GRAD, META_INPUT, META_LOGITS, META_RULES, META_SEED, META_VALUE
from .control_flow import effective_inputs
from .graph import Builder
from .prepare import Analysis
from .rules.registry import Rule


def logits_shape(model: onnx.ModelProto, logits: str, shapes: dict) -> list:
    """The logits' dims; where shape inference left a classifier's [N, C] unknown, N is the
    image input's batch axis and C the declared class count (or the symbols 'N' and 'C')."""
    lshape = shapes.get(logits)
    if lshape is None:  # (a scalar has the shape [], which is known)
        lshape = [None, None]
    if len(lshape) != 2 or None not in lshape:
        return list(lshape)
    try:
        batch = find_image_input(model).shape[0]
        spec = find_logits(model)
    except (ModelError, OptionError):  # not an image classifier (a test graph): symbols only
        batch, spec = None, None
    classes = spec.num_classes if spec is not None and spec.tensor == logits else None
    return [lshape[0] if lshape[0] is not None else (batch if batch is not None else "N"),
            lshape[1] if lshape[1] is not None else (classes or "C")]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)


def _fresh_output(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _seed(a: Analysis, b: Builder, taken: set[str]) -> tuple[str, list, dict[str, list[str]]]:
    """Add the seed input, the cotangent of the logits [K, N, C]; return its name, the logits'
    dims and the first cotangent terms."""
    seed_name = "onnxsal_seed" if "onnxsal_seed" not in taken else b.fresh("seed")
    taken.add(seed_name)
    lshape = logits_shape(a.model, a.logits, a.shapes)
    seed_dims = ["K"] + [d if d is not None else f"logits_{i}" for i, d in enumerate(lshape)]
    ltype = a.dtypes.get(a.logits, TensorProto.FLOAT)
    a.model.graph.input.append(helper.make_tensor_value_info(seed_name, ltype, seed_dims))
    b.k_name = b.shape(seed_name, 0, 1)
    first = seed_name if len(lshape) == 2 else b.reshape_cot(seed_name, a.logits)
    return seed_name, lshape, {a.logits: [first]}


def _outputs(a: Analysis, b: Builder, taken: set[str], cot: dict, final: dict,
             meta: dict[str, str]) -> None:
    """The gradient outputs of the wrt tensors (and the forward values of intermediate ones)."""
    g = a.model.graph
    out_names = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    for t in a.wrt:
        dtype = a.dtypes.get(t, TensorProto.FLOAT)
        terms = cot.get(t)
        gsum = final.get(t) or (b.accumulate(terms, t) if terms else b.zeros_cot(t, dtype))
        out = _fresh_output(f"onnxsal_grad_{_safe(t)}", taken)
        b.nodes.append(helper.make_node("Identity", [gsum], [out], name=b.fresh("grad_out")))
        tshape = a.shapes.get(t) or []  # unknown rank: declared without dims below
        g.output.append(helper.make_tensor_value_info(
            out, dtype, ["K"] + [d if d is not None else f"{_safe(t)}_{i}" for i, d in enumerate(tshape)]))
        meta[META_GRAD + t] = out
        if t not in graph_inputs:
            if t not in out_names:
                g.output.append(helper.make_tensor_value_info(t, dtype, None))
                out_names.add(t)
            meta[META_VALUE + t] = t


def _live(nodes: list, inits: list, g: onnx.GraphProto) -> tuple[list, list]:
    """The backward nodes and initializers that some output depends on (rules may build
    terms that the pass then replaces, e.g. padded slices joined by one Concat)."""
    wanted = {o.name for o in g.output} | {i for n in g.node for i in effective_inputs(n)}
    kept = control_flow.live(nodes, wanted)
    return kept, [t for t in inits if t.name in wanted]


def reverse(a: Analysis, rule_table: dict[str, Rule], ruleset: str, options: dict) -> dict[str, str]:
    """Add the backward graph to ``a.model`` in place; return the roles for its metadata."""
    g = a.model.graph
    taken = control_flow.all_names(g)
    b = Builder(a.opset, taken)
    ctx = Context(b, a.shapes, a.dtypes, a.consts, a.need, ruleset, options, graph=g, rules=rule_table,
                  wrt=a.wrt, shape_values=a.shape_values)
    seed_name, lshape, cot = _seed(a, b, taken)
    final = ctx.walk(a.active, cot)
    try:
        image_input = find_image_input(a.model).name
    except ModelError:  # not an image model (a test graph, a feature extractor): first wrt
        image_input = a.wrt[0]
    meta = {META_SEED: seed_name, META_LOGITS: a.logits, META_RULES: ruleset, META_INPUT: image_input}
    if a.logits not in {o.name for o in g.output}:
        g.output.append(helper.make_tensor_value_info(a.logits, a.dtypes.get(a.logits, TensorProto.FLOAT), lshape))
    _outputs(a, b, taken, cot, final, meta)
    nodes, inits = _live(b.nodes, b.initializers, g)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.value_info[:]
    return meta
