"""The reverse-mode pass: ONNX model in, ONNX model with its backward graph out.

Contract of the augmented model (the names of its roles are in ``metadata_props``):

* the original inputs and outputs stay;
* a new float input ``onnxsal.seed`` carries the cotangent of the logits, shape [K, N, C]
  (K seed rows; an identity seed gives every class);
* for every requested tensor T a new output ``onnxsal.grad.<T>`` holds dS/dT contracted with
  each seed row, shape [K] + shape(T);
* for requested intermediate tensors the forward value is an output too
  (``onnxsal.value.<T>``), and the logits are an output (``onnxsal.logits``).

The forward pass runs once; the backward pass treats the K seed rows as one leading axis
(folded into the batch axis for convolutions), so one run returns every class.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError, OptionError, UnsupportedOperatorError, first_line
from ..model import dim_of
from . import broadcast, contrib, control_flow, expand, fusion
from .control_flow import effective_inputs
from .graph import Builder, Dim
from .rules.registry import Rule, table

META_SEED = "onnxsal.seed"
META_LOGITS = "onnxsal.logits"
META_GRAD = "onnxsal.grad."
META_VALUE = "onnxsal.value."
META_RULES = "onnxsal.rules"
META_INPUT = "onnxsal.input"

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
MIN_OPSET = 11  # Range, ScatterElements, Slice with steps; older models are upgraded
MAX_IR_VERSION = 10  # onnxruntime >= 1.18 reads it; onnx >= 1.23 would write 14 otherwise


class Context:
    """What a rule may ask about the forward graph, plus the node builder."""

    def __init__(self, b: Builder, shapes: dict[str, list[Dim] | None], dtypes: dict[str, int],
                 consts: dict[str, np.ndarray], need: set[str], ruleset: str, options: dict,
                 graph: onnx.GraphProto | None = None, rules: dict[str, Rule] | None = None,
                 wrt: Sequence[str] = (), shape_values: dict | None = None):
        self.b = b
        self.opset = b.opset
        self._shapes = shapes
        self._dtypes = dtypes
        self._consts = consts
        self._shape_values = shape_values or {}
        self._need = need
        self.ruleset = ruleset
        self.options = options
        self.rules = rules or {}
        self.wrt = set(wrt)
        self.node: onnx.NodeProto | None = None
        self._producer: dict[str, onnx.NodeProto] = {}
        self._uses: dict[str, int] = {}
        self._position: dict[int, int] = {}
        if graph is not None:
            for k, n in enumerate(graph.node):
                self._position[id(n)] = k
                for o in n.output:
                    if o:
                        self._producer[o] = n
                for i in effective_inputs(n):
                    if i:
                        self._uses[i] = self._uses.get(i, 0) + 1
            for o in graph.output:
                self._uses[o.name] = self._uses.get(o.name, 0) + 1

    # static facts ----------------------------------------------------------------------
    def facts(self) -> tuple[dict, dict, dict, dict]:
        """Copies of (shapes, dtypes, consts, shape values), for a subgraph to extend."""
        return dict(self._shapes), dict(self._dtypes), dict(self._consts), dict(self._shape_values)

    def shape(self, name: str) -> list[Dim] | None:
        return self._shapes.get(name)

    def rank(self, name: str) -> int:
        s = self._shapes.get(name)
        if s is None:
            raise ModelError(f"rank of tensor '{name}' is unknown (node '{self.node.name}', "
                             f"{self.node.op_type}); shape inference could not determine it")
        return len(s)

    def dtype(self, name: str) -> int:
        return self._dtypes.get(name, TensorProto.FLOAT)

    def const(self, name: str) -> np.ndarray | None:
        return self._consts.get(name)

    def shape_value(self, name: str) -> list | None:
        """A 1-D integer tensor's value as dims (int, symbol or None) when the graph computes it
        from shapes, e.g. ['N', 3, 6, 7]; None when unknown."""
        c = self._consts.get(name)
        if c is not None and c.ndim == 1 and c.dtype.kind == "i":
            return [int(v) for v in c]
        v = self._shape_values.get(name)
        return v if isinstance(v, list) else None

    def needs_grad(self, name: str) -> bool:
        return name in self._need

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The forward node that computes ``name`` (None for inputs and initializers)."""
        return self._producer.get(name)

    def uses(self, name: str) -> int:
        """How many node inputs and graph outputs read ``name`` in the forward graph."""
        return self._uses.get(name, 0)

    def position(self, node: onnx.NodeProto) -> int:
        """The node's index in the forward graph (a topological order)."""
        return self._position[id(node)]

    def scalar(self, value: float, like: str) -> str:
        return self.b.scalar(value, self.dtype(like))

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def input(self, node: onnx.NodeProto, i: int) -> str | None:
        return node.input[i] if len(node.input) > i and node.input[i] else None

    def ensure_output(self, node: onnx.NodeProto, i: int, hint: str) -> str:
        """Name of the forward node's i-th output, adding it when the model left it out."""
        while len(node.output) <= i:
            node.output.append("")
        if not node.output[i]:
            node.output[i] = self.b.fresh(hint)
        return node.output[i]

    # shared helpers --------------------------------------------------------------------
    def unbroadcast(self, dy: str, x: str, y: str, skip_last: int = 0) -> str:
        """Sum a cotangent of the broadcast result y ([K] + shape(y)) down to [K] + shape(x)
        (see :func:`.broadcast.unbroadcast`)."""
        return broadcast.unbroadcast(self, dy, x, y, skip_last)


def _collect_static(g: onnx.GraphProto, shapes: dict | None = None,
                    dtypes: dict | None = None) -> tuple[dict, dict]:
    """Shapes and element types the graph records (added to ``shapes``, ``dtypes``)."""
    shapes = {} if shapes is None else shapes
    dtypes = {} if dtypes is None else dtypes

    def add(vi):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [dim_of(d) for d in t.shape.dim]
        else:
            shapes[vi.name] = None

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        add(vi)
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def _collect_consts(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    consts[node.output[0]] = np.asarray(helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    consts[node.output[0]] = np.asarray(helper.get_attribute_value(a))
    return consts


NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
FOLD_LIMIT = 1 << 22  # elements in a folded node's inputs; larger work stays at run time


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
    if op == "Concat" and attrs.get("axis") in (0, -1) and all(isinstance(v, list) for v in ins):
        return [d for v in ins for d in v]
    if op == "Gather" and isinstance(ins[0], list) and attrs.get("axis", 0) == 0 and ins[1] is not None:
        picked = [ins[0][i] for i in (ins[1] if isinstance(ins[1], list) else ins[1])]
        return picked if isinstance(ins[1], list) else tuple(picked)
    if op == "Unsqueeze" and isinstance(ins[0], tuple):
        return list(ins[0])
    if op == "Squeeze" and isinstance(ins[0], list) and len(ins[0]) == 1:
        return tuple(ins[0])
    if op == "Slice" and isinstance(ins[0], list):
        if len(node.input) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
            starts, ends = ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
        else:
            starts, ends, axes, steps = attrs.get("starts"), attrs.get("ends"), attrs.get("axes", [0]), [1]
        if not all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], int)
                   for v in (starts, ends, axes, steps)) or axes[0] not in (0, -1):
            return None
        return ins[0][starts[0]:ends[0]:steps[0]]
    return None


def _fold_static(graph: onnx.GraphProto, opset: int, shapes: dict, consts: dict) -> dict:
    """Add to ``consts`` the values the graph computes from constants and static shapes alone
    (a Shape of a static tensor, a Size of a known shape, and any standard node whose inputs
    are all such values), evaluated by onnx's reference implementation. Rules then see, say,
    the axes a function body computes as Range(0, Size(Shape(x))) as constants.

    Returns the shape computations known in part, as dims (see _shape_value): with a dynamic
    batch, Concat(Shape(x)[:2], [6, 7]) is ['N', 3, 6, 7]."""
    from onnx.reference import ReferenceEvaluator

    def static(name):
        dims = shapes.get(name)
        return dims if dims is not None and all(isinstance(d, int) for d in dims) else None

    known: dict = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output or node.output[0] in consts \
                or node.op_type in NONDETERMINISTIC | {"Constant"} \
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        ins = [i for i in node.input if i]
        if node.op_type == "Size" and static(ins[0]) is not None:
            consts[node.output[0]] = np.asarray(int(np.prod(static(ins[0]), dtype=np.int64)), np.int64)
            continue
        try:
            dims = _shape_value(node, shapes, consts, known)
        except (IndexError, TypeError):  # an index out of range: the run will say so
            dims = None
        if dims is not None:
            if all(isinstance(d, int) for d in dims):
                consts[node.output[0]] = np.asarray(dims if isinstance(dims, list) else dims[0], np.int64)
            else:
                known[node.output[0]] = dims
            continue
        if not all(i in consts for i in ins) or sum(np.size(consts[i]) for i in ins) > FOLD_LIMIT:
            continue
        try:
            vis = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype),
                                                 list(np.shape(consts[i]))) for i in ins]
            outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
            m = helper.make_model(helper.make_graph([node], "fold", vis, outs),
                                  opset_imports=[helper.make_opsetid("", opset)])
            vals = ReferenceEvaluator(m).run(None, {i: consts[i] for i in ins})
        except Exception:  # anything the reference cannot evaluate stays a run-time value
            continue
        for o, v in zip([o for o in node.output if o], vals):
            if isinstance(v, np.ndarray) or np.isscalar(v):
                consts[o] = np.asarray(v)
    return known


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default-domain opset")


def _convert_opset(model: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # onnx raises RuntimeError/ValueError with long texts
        raise ModelError(f"cannot upgrade the model from opset {default_opset(model)} to {target} "
                         f"({why}): {first_line(exc)}") from None
    return converted


def _path(graph: onnx.GraphProto, wrt: Sequence[str], targets: Sequence[str], dtypes: dict[str, int]):
    """Nodes between the wrt tensors and the targets, and the tensors that need a cotangent
    (a node depends on the outer tensors its subgraphs read, too)."""
    from ..model import NO_GRADIENT_OPS

    fwd = set(wrt)
    # integer tensors that carry a cotangent: QuantizeLinear's (rules/quant.py), and what other
    # nodes compute from them, so that an integer-domain operator (QLinearConv...) between the
    # input and the logits is reported instead of cutting the path without a word
    carriers = set()
    for node in graph.node:
        ins = effective_inputs(node)
        if any(i in fwd for i in ins if i):
            for o in node.output:
                if o and dtypes.get(o, TensorProto.FLOAT) in FLOAT_TYPES:
                    fwd.add(o)
                elif o and (node.op_type == "QuantizeLinear" or any(i in carriers for i in ins)) \
                        and node.op_type not in NO_GRADIENT_OPS:
                    fwd.add(o)
                    carriers.add(o)
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


def _probe_ranks(model: onnx.ModelProto, names: list[str], shapes: dict) -> None:
    """Fill in unknown ranks by running the model once on a small input (onnxruntime)."""
    import onnxruntime as ort

    from ..model import PROBE_BUDGET, check_tensor_sizes

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
        dims = [dim_of(d) for d in t.shape.dim]
        dims = [d if isinstance(d, int) else (2 if i == 0 else 64) for i, d in enumerate(dims)]
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


def _logits_shape(model: onnx.ModelProto, logits: str, shapes: dict) -> list:
    """The logits' dims; where shape inference left a classifier's [N, C] unknown, N is the
    image input's batch axis and C the declared class count (or the symbols 'N' and 'C')."""
    from ..model import find_image_input, find_logits

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


def _ir_version_for(model: onnx.ModelProto) -> int:
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except TypeError:
        needed = helper.find_min_ir_version_for(list(model.opset_import))
    return max(min(model.ir_version, MAX_IR_VERSION), needed)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)


def _live(nodes: list, inits: list, g: onnx.GraphProto) -> tuple[list, list]:
    """The backward nodes and initializers that some output depends on (rules may build
    terms that the pass then replaces, e.g. padded slices joined by one Concat)."""
    wanted = {o.name for o in g.output} | {i for n in g.node for i in effective_inputs(n)}
    kept = control_flow.live(nodes, wanted)
    return kept, [t for t in inits if t.name in wanted]


def check_rules(active: list, rule_table: dict[str, Rule], g: onnx.GraphProto) -> None:
    """Raise UnsupportedOperatorError naming every active node without a rule."""
    unsupported: dict[str, list[str]] = {}
    for node in active:
        if node.domain not in ("", "ai.onnx") or node.op_type not in rule_table:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            unsupported.setdefault(key, []).append(node.name or f"#{list(g.node).index(node)}")
    if unsupported:
        raise UnsupportedOperatorError(unsupported)


def backward(ctx: Context, active: list, cot: dict[str, list[str]]) -> dict[str, str]:
    """Run the rules over the active nodes in reverse order, adding each input's cotangent
    terms to ``cot``; return the cotangents of the wrt tensors that active nodes compute."""
    b, final = ctx.b, {}
    for node in reversed(active):
        dys = []
        for o in node.output:
            terms = cot.pop(o, None) if o else None
            dys.append(b.accumulate(terms, o) if terms else None)
            if o in ctx.wrt and dys[-1] is not None:
                final[o] = dys[-1]
        if all(d is None for d in dys):
            continue
        ctx.node = node
        fused = fusion.gradient(ctx, node, dys)
        if fused is not None:  # the nodes between x and this one get no cotangent
            x, dx = fused
            if dx is not None:
                cot.setdefault(x, []).append(dx)
            continue
        grads = ctx.rules[node.op_type].fn(ctx, node, dys)
        for name, gname in zip(effective_inputs(node), grads):
            if name and gname is not None and ctx.needs_grad(name):
                cot.setdefault(name, []).append(gname)
    return final


def augment(model: onnx.ModelProto, wrt: Sequence[str] | None = None, rules: str = "default",
            logits: str | None = None, options: dict | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with its backward graph (see the module docstring).

    ``wrt``: tensors to differentiate with respect to (default: the image input).
    ``rules``: a rule set (:func:`.rules.registry.ruleset_names`). ``logits``: the tensor
    whose cotangent is seeded (default: found by :func:`onnxsal.model.find_logits`).
    ``options``: rule-set parameters, e.g. ``{"epsilon": 1e-6}`` for ``lrp``.
    """
    from ..model import find_image_input, find_logits

    rule_table: dict[str, Rule] = table(rules)
    options = dict(options or {})
    model = contrib.lower(expand.inline_local(copy.deepcopy(model)))
    opset = default_opset(model)
    if opset < MIN_OPSET:
        model = _convert_opset(model, MIN_OPSET, f"the gradient rules need opset {MIN_OPSET} or newer")
        opset = MIN_OPSET
    logits_name = logits or find_logits(model).tensor
    wrt = list(wrt) if wrt else [find_image_input(model).name]

    def analysed(model):
        del model.graph.value_info[:]  # some exporters write wrong ones; infer them afresh
        for vi in list(model.graph.input) + list(model.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and dim_of(d) is None:
                    d.Clear()  # -1 (paddle2onnx) is a dynamic axis, not a size to propagate
        for sub in (g for n in control_flow.walk(model.graph.node) for g in control_flow.subgraphs(n)):
            del sub.value_info[:]
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        shapes, dtypes = _collect_static(model.graph)
        return (model, shapes, dtypes) + _path(model.graph, wrt, [logits_name], dtypes)

    model, shapes, dtypes, active, need = analysed(model)
    for _ in range(4):  # an If whose condition is known: its taken branch (nested ones next)
        if not any(n.op_type == "If" for n in model.graph.node):
            break
        consts = _collect_consts(model.graph)
        _fold_static(model.graph, opset, shapes, consts)
        if not control_flow.inline_static_ifs(model.graph, consts):
            break
        model, shapes, dtypes, active, need = analysed(model)
    known = set(shapes) | {o for n in model.graph.node for o in n.output}
    for t in wrt + [logits_name]:
        if t not in known:
            raise OptionError(f"tensor '{t}' is not in the model's graph")
    for _ in range(4):  # a body may hold further function operators
        inline = {n.op_type for n in control_flow.walk(active) if n.domain in expand.STANDARD
                  and n.op_type not in rule_table and expand.expandable(n.op_type, opset)}
        if not inline:
            break
        model, shapes, dtypes, active, need = analysed(expand.expand_standard(model, inline))
    g = model.graph

    check_rules(active, rule_table, g)
    if logits_name not in need:  # every gradient would be zero: say where the path is cut
        from ..model import NO_GRADIENT_OPS

        cut = [n.name or n.op_type for n in g.node if n.op_type not in NO_GRADIENT_OPS
               and any(i in need for i in effective_inputs(n)) and any(o and o not in need for o in n.output)]
        raise ModelError(f"the logits '{logits_name}' do not depend on {', '.join(map(repr, wrt))} "
                         f"through float tensors, so every gradient would be zero"
                         + (f" (integer outputs at {', '.join(cut[:5])})" if cut else ""))

    needed_opset = max([rule_table[n.op_type].opset_for(n) for n in active] + [opset])
    if needed_opset > opset:
        model = _convert_opset(model, needed_opset, "a gradient rule needs it")
        opset = needed_opset
        model, shapes, dtypes, active, need = analysed(model)
        g = model.graph

    consts = _collect_consts(g)
    shape_values = _fold_static(g, opset, shapes, consts)
    unknown = sorted({t for n in active for t in effective_inputs(n) + list(n.output)
                      if t and shapes.get(t) is None and t not in consts})
    if unknown:
        _probe_ranks(model, unknown, shapes)

    taken = control_flow.all_names(g)
    b = Builder(opset, taken)
    ctx = Context(b, shapes, dtypes, consts, need, rules, options, graph=g, rules=rule_table, wrt=wrt,
                  shape_values=shape_values)

    # the seed input: the cotangent of the logits, [K, N, C]
    seed_name = "onnxsal_seed" if "onnxsal_seed" not in taken else b.fresh("seed")
    taken.add(seed_name)
    lshape = _logits_shape(model, logits_name, shapes)
    seed_dims = ["K"] + [d if d is not None else f"logits_{i}" for i, d in enumerate(lshape)]
    ltype = dtypes.get(logits_name, TensorProto.FLOAT)
    g.input.append(helper.make_tensor_value_info(seed_name, ltype, seed_dims))
    b.k_name = b.shape(seed_name, 0, 1)

    cot: dict[str, list[str]] = {}
    if len(lshape) == 2:
        cot[logits_name] = [seed_name]
    else:
        cot[logits_name] = [b.reshape_cot(seed_name, logits_name)]

    final = backward(ctx, active, cot)

    # outputs: logits, gradients, forward values of intermediate tensors
    out_names = {o.name for o in g.output}
    try:
        image_input = find_image_input(model).name
    except ModelError:  # not an image model (a test graph, a feature extractor): first wrt
        image_input = wrt[0]
    meta = {META_SEED: seed_name, META_LOGITS: logits_name, META_RULES: rules,
            META_INPUT: image_input}
    if logits_name not in out_names:
        g.output.append(helper.make_tensor_value_info(logits_name, ltype, lshape))
    graph_inputs = {i.name for i in g.input}
    for t in wrt:
        terms = cot.get(t)
        gsum = final.get(t) or (b.accumulate(terms, t) if terms else b.zeros_cot(t, dtypes.get(t, TensorProto.FLOAT)))
        out = f"onnxsal_grad_{_safe(t)}"
        while out in taken:
            out += "_"
        taken.add(out)
        b.nodes.append(helper.make_node("Identity", [gsum], [out], name=b.fresh("grad_out")))
        tshape = shapes.get(t) or []  # unknown rank: declared without dims below
        g.output.append(helper.make_tensor_value_info(
            out, dtypes.get(t, TensorProto.FLOAT), ["K"] + [d if d is not None else f"{_safe(t)}_{i}" for i, d in enumerate(tshape)]))
        meta[META_GRAD + t] = out
        if t not in graph_inputs:
            if t not in out_names:
                g.output.append(helper.make_tensor_value_info(t, dtypes.get(t, TensorProto.FLOAT), None))
                out_names.add(t)
            meta[META_VALUE + t] = t

    nodes, inits = _live(b.nodes, b.initializers, g)
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.value_info[:]
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model.ir_version = _ir_version_for(model)
    return model


def augmented_roles(model: onnx.ModelProto) -> dict[str, str]:
    """The onnxsal.* metadata of an augmented model (empty for a plain one)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("onnxsal.")}
