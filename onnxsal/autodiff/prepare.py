"""Preparation of a model for the reverse walk: inlining, lowering, opset upgrade, shape
inference, static folding and the active path, in one analysed-model value (:class:`Analysis`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contrib
from ..errors import ModelError, OptionError, UnsupportedOperatorError, first_line
from ..model import NO_GRADIENT_OPS, PROBE_BUDGET, check_tensor_sizes, dim_of, find_image_input, find_logits
from . import control_flow, expand
from .control_flow import effective_inputs
from .rules.registry import Rule

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
MIN_OPSET = 11  # Range, ScatterElements, Slice with steps; older models are upgraded
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
FOLD_LIMIT = 1 << 22  # elements in a folded node's inputs; larger work stays at run time


@dataclass
class Analysis:
    """A model ready for the reverse walk, with what the rules may ask about it."""

    model: onnx.ModelProto
    opset: int
    wrt: list[str]
    logits: str
    shapes: dict
    dtypes: dict[str, int]
    active: list[onnx.NodeProto]
    need: set[str]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    shape_values: dict = field(default_factory=dict)


def collect_static(g: onnx.GraphProto, shapes: dict | None = None,
                   dtypes: dict | None = None) -> tuple[dict, dict]:
    """Shapes and element types the graph records (added to ``shapes``, ``dtypes``)."""
    shapes = {} if shapes is None else shapes
    dtypes = {} if dtypes is None else dtypes
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        shapes[vi.name] = [dim_of(d) for d in t.shape.dim] if t.HasField("shape") else None
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def collect_consts(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The values of the graph's initializers and Constant nodes."""
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    consts[node.output[0]] = np.asarray(helper.get_attribute_value(a))
    return consts


def _slice_value(node: onnx.NodeProto, attrs: dict, ins: list):
    if len(node.input) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
    else:
        starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes", [0]), [1]
    if axes is None or not all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], int)
               for v in (starts, ends, axes, steps)) or axes[0] not in (0, -1):
        return None
    return ins[0][starts[0]:ends[0]:steps[0]]


def _gather_value(ins: list):
    picked = [ins[0][i] for i in (ins[1] if isinstance(ins[1], list) else ins[1])]
    return picked if isinstance(ins[1], list) else tuple(picked)


def _shape_value(node: onnx.NodeProto, shapes: dict, consts: dict, known: dict):
    """The value of a shape computation as dims (int, a symbol such as 'N', or None), for
    Shape, Slice, Gather, Concat, Unsqueeze, Squeeze, Cast to int64 and Identity on such
    values; None when it is not one. Scalars are 1-tuples."""
    def value(name):
        if name in known:
            return known[name]
        c = consts.get(name)
        if c is not None and c.dtype.kind == "i" and c.ndim <= 1:
            return [int(v) for v in c] if c.ndim == 1 else (int(c),)
        return None

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = [value(i) if i else None for i in node.input]
    op = node.op_type
    if op == "Shape":
        dims = shapes.get(node.input[0])
        return None if dims is None else list(dims)[attrs.get("start", 0):attrs.get("end", len(dims))]
    if op == "Identity" or (op == "Cast" and attrs.get("to") == TensorProto.INT64):
        return ins[0]  # (a Cast to another type is the reference evaluator's to fold)
    lists = [v for v in ins if isinstance(v, list)]
    if op == "Concat" and attrs.get("axis") in (0, -1) and len(lists) == len(ins):
        return [d for v in lists for d in v]
    if op == "Gather" and isinstance(ins[0], list) and attrs.get("axis", 0) == 0 and ins[1] is not None:
        return _gather_value(ins)
    if op == "Unsqueeze" and isinstance(ins[0], tuple):
        return list(ins[0])
    if op == "Squeeze" and isinstance(ins[0], list) and len(ins[0]) == 1:
        return tuple(ins[0])
    if op == "Slice" and isinstance(ins[0], list):
        return _slice_value(node, attrs, ins)
    return None


def _foldable(node: onnx.NodeProto, consts: dict) -> bool:
    """A deterministic standard node without subgraphs whose value is not known yet."""
    return node.domain in ("", "ai.onnx") and bool(node.output) and node.output[0] not in consts \
        and node.op_type not in NONDETERMINISTIC | {"Constant"} \
        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _evaluate(node: onnx.NodeProto, ins: list[str], opset: int, consts: dict) -> None:
    """Add the node's outputs to ``consts`` when onnx's reference implementation computes them
    from the constant inputs ``ins`` (small work only)."""
    from onnx.reference import ReferenceEvaluator

    if not all(i in consts for i in ins) or sum(np.size(consts[i]) for i in ins) > FOLD_LIMIT:
        return
    try:
        vis = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype),
                                             list(np.shape(consts[i]))) for i in ins]
        outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        m = helper.make_model(helper.make_graph([node], "fold", vis, outs),
                              opset_imports=[helper.make_opsetid("", opset)])
        vals = ReferenceEvaluator(m).run(None, {i: consts[i] for i in ins})
    except Exception:  # anything the reference cannot evaluate stays a run-time value
        return
    for o, v in zip([o for o in node.output if o], vals):
        if isinstance(v, np.ndarray) or np.isscalar(v):
            consts[o] = np.asarray(v)


def fold_static(graph: onnx.GraphProto, opset: int, shapes: dict, consts: dict) -> dict:
    """Add to ``consts`` the values the graph computes from constants and static shapes alone
    (a Shape of a static tensor, a Size of a known shape, and any standard node whose inputs
    are all such values), evaluated by onnx's reference implementation. Rules then see, say,
    the axes a function body computes as Range(0, Size(Shape(x))) as constants.

    Returns the shape computations known in part, as dims (see _shape_value): with a dynamic
    batch, Concat(Shape(x)[:2], [6, 7]) is ['N', 3, 6, 7]."""
    def static(name):
        dims = shapes.get(name)
        return dims if dims is not None and all(isinstance(d, int) for d in dims) else None

    known: dict = {}
    for node in graph.node:
        if not _foldable(node, consts):
            continue
        ins = [i for i in node.input if i]
        if node.op_type == "Size" and static(ins[0]) is not None:
            consts[node.output[0]] = np.asarray(int(np.prod(static(ins[0]), dtype=np.int64)), np.int64)
            continue
        try:
            dims = _shape_value(node, shapes, consts, known)
        except (IndexError, TypeError):  # an index out of range: the run will say so
            dims = None
        if dims is None:
            _evaluate(node, ins, opset, consts)
        elif all(isinstance(d, int) for d in dims):
            consts[node.output[0]] = np.asarray(dims if isinstance(dims, list) else dims[0], np.int64)
        else:
            known[node.output[0]] = dims
    return known


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default-domain opset")


def convert_opset(model: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    """The model upgraded to opset ``target`` by onnx's version converter."""
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # onnx raises RuntimeError/ValueError with long texts
        raise ModelError(f"cannot upgrade the model from opset {default_opset(model)} to {target} "
                         f"({why}): {first_line(exc)}") from None
    return converted


def _forward(graph: onnx.GraphProto, wrt: Sequence[str], dtypes: dict[str, int]) -> tuple[set, set]:
    """The tensors that depend on the wrt tensors through differentiable values, and the
    integer ones among them that carry a cotangent: QuantizeLinear's (rules/quant.py), and what
    other nodes compute from them, so that an integer-domain operator (QLinearConv...) between
    the input and the logits is reported instead of cutting the path without a word."""
    fwd, carriers = set(wrt), set()
    for node in graph.node:
        ins = effective_inputs(node)
        if not any(i in fwd for i in ins if i):
            continue
        carries = (node.op_type == "QuantizeLinear" or any(i in carriers for i in ins)) \
            and node.op_type not in NO_GRADIENT_OPS
        for o in node.output:
            if o and dtypes.get(o, TensorProto.FLOAT) in FLOAT_TYPES:
                fwd.add(o)
            elif o and carries:
                fwd.add(o)
                carriers.add(o)
    return fwd, carriers


def active_path(graph: onnx.GraphProto, wrt: Sequence[str], targets: Sequence[str],
                dtypes: dict[str, int]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes between the wrt tensors and the targets, and the tensors that need a cotangent
    (a node depends on the outer tensors its subgraphs read, too)."""
    fwd, carriers = _forward(graph, wrt, dtypes)
    bwd = set(targets)
    active = []
    for node in reversed(graph.node):
        if any(o in bwd for o in node.output if o):
            # active: a differentiable input feeds a differentiable output that reaches the
            # target (Shape(x) and other integer paths carry no gradient)
            ins = effective_inputs(node)
            if any(i in fwd for i in ins if i) and any(o in fwd and o in bwd for o in node.output if o):
                active.append(node)
            bwd.update(i for i in ins if i)
    need = {t for t in fwd & bwd if dtypes.get(t, TensorProto.FLOAT) in FLOAT_TYPES or t in carriers}
    active.reverse()
    return active, need


def probe_ranks(model: onnx.ModelProto, names: list[str], shapes: dict) -> None:
    """Fill in unknown ranks by running the model once on a small input (onnxruntime)."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    inits = {i.name for i in m.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        declared = [dim_of(d) for d in t.shape.dim]
        dims = [d if isinstance(d, int) else (2 if i == 0 else 64) for i, d in enumerate(declared)]
        feeds[vi.name] = np.random.default_rng(0).random(dims).astype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    check_tensor_sizes(m, PROBE_BUDGET, {k: v.shape for k, v in feeds.items()})  # no bomb runs
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(names, feeds)
    except Exception as exc:
        raise ModelError(f"shape inference left the rank of {names[:3]} unknown and a probe run "
                         f"failed: {str(exc).splitlines()[0]}") from None
    for n, v in zip(names, outs):
        shapes[n] = [None] * np.ndim(v)


def check_rules(active: list, rule_table: dict[str, Rule], g: onnx.GraphProto) -> None:
    """Raise UnsupportedOperatorError naming every active node without a rule."""
    unsupported: dict[str, list[str]] = {}
    for node in active:
        if node.domain not in ("", "ai.onnx") or node.op_type not in rule_table:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            unsupported.setdefault(key, []).append(node.name or f"#{list(g.node).index(node)}")
    if unsupported:
        raise UnsupportedOperatorError(unsupported)


# -- the preparation phases ----------------------------------------------------------------

def _analysed(model: onnx.ModelProto, opset: int, wrt: list[str], logits: str) -> Analysis:
    """Shape inference afresh and the active path."""
    del model.graph.value_info[:]  # some exporters write wrong ones; infer them afresh
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and dim_of(d) is None:
                d.Clear()  # -1 (paddle2onnx) is a dynamic axis, not a size to propagate
    for sub in (g for n in control_flow.walk(model.graph.node) for g in control_flow.subgraphs(n)):
        del sub.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes, dtypes = collect_static(model.graph)
    active, need = active_path(model.graph, wrt, [logits], dtypes)
    return Analysis(model, opset, wrt, logits, shapes, dtypes, active, need)


def _inline_static_ifs(a: Analysis) -> Analysis:
    """An If whose condition is known becomes its taken branch (nested ones next)."""
    for _ in range(4):
        if not any(n.op_type == "If" for n in a.model.graph.node):
            break
        consts = collect_consts(a.model.graph)
        fold_static(a.model.graph, a.opset, a.shapes, consts)
        if not control_flow.inline_static_ifs(a.model.graph, consts):
            break
        a = _analysed(a.model, a.opset, a.wrt, a.logits)
    return a


def _check_names(a: Analysis) -> None:
    known = set(a.shapes) | {o for n in a.model.graph.node for o in n.output}
    for t in a.wrt + [a.logits]:
        if t not in known:
            raise OptionError(f"tensor '{t}' is not in the model's graph")


def _expand_functions(a: Analysis, rule_table: dict[str, Rule]) -> Analysis:
    """Standard function operators without a rule become their ONNX function bodies (a body
    may hold further ones)."""
    for _ in range(4):
        inline = {n.op_type for n in control_flow.walk(a.active) if n.domain in expand.STANDARD
                  and n.op_type not in rule_table and expand.expandable(n.op_type, a.opset)}
        if not inline:
            break
        a = _analysed(expand.expand_standard(a.model, inline), a.opset, a.wrt, a.logits)
    return a


def _check_path(a: Analysis) -> None:
    """Every gradient would be zero when the logits do not need one: say where the path is cut."""
    if a.logits in a.need:
        return
    cut = [n.name or n.op_type for n in a.model.graph.node if n.op_type not in NO_GRADIENT_OPS
           and any(i in a.need for i in effective_inputs(n)) and any(o and o not in a.need for o in n.output)]
    raise ModelError(f"the logits '{a.logits}' do not depend on {', '.join(map(repr, a.wrt))} "
                     f"through float tensors, so every gradient would be zero"
                     + (f" (integer outputs at {', '.join(cut[:5])})" if cut else ""))


def _upgrade_for_rules(a: Analysis, rule_table: dict[str, Rule]) -> Analysis:
    needed = max([rule_table[n.op_type].opset_for(n) for n in a.active] + [a.opset])
    if needed <= a.opset:
        return a
    return _analysed(convert_opset(a.model, needed, "a gradient rule needs it"), needed, a.wrt, a.logits)


def _static_facts(a: Analysis) -> None:
    """Constants, folded shape computations, and the ranks shape inference left unknown."""
    a.consts = collect_consts(a.model.graph)
    a.shape_values = fold_static(a.model.graph, a.opset, a.shapes, a.consts)
    unknown = sorted({t for n in a.active for t in effective_inputs(n) + list(n.output)
                      if t and a.shapes.get(t) is None and t not in a.consts})
    if unknown:
        probe_ranks(a.model, unknown, a.shapes)


def prepare(model: onnx.ModelProto, wrt: Sequence[str] | None, logits: str | None,
            rule_table: dict[str, Rule]) -> Analysis:
    """A copy of ``model`` ready for the reverse walk: local functions inlined, onnxruntime's
    fused operators lowered, the opset the rules need, the active path checked against the rules."""
    model = contrib.lower(expand.inline_local(copy.deepcopy(model)))
    opset = default_opset(model)
    if opset < MIN_OPSET:
        model = convert_opset(model, MIN_OPSET, f"the gradient rules need opset {MIN_OPSET} or newer")
        opset = MIN_OPSET
    logits_name = logits or find_logits(model).tensor
    wrt_names = list(wrt) if wrt else [find_image_input(model).name]
    a = _inline_static_ifs(_analysed(model, opset, wrt_names, logits_name))
    _check_names(a)
    a = _expand_functions(a, rule_table)
    check_rules(a.active, rule_table, a.model.graph)
    _check_path(a)
    a = _upgrade_for_rules(a, rule_table)
    _static_facts(a)
    return a
