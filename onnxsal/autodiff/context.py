"""The rule context: what a backward rule may ask about the forward graph, the node builder,
and the reverse walk over the active nodes (also used for the branches of an If)."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from . import broadcast, fusion
from .control_flow import effective_inputs, live
from .graph import Builder, Dim
from .prepare import active_path, check_rules, collect_consts, collect_static, fold_static
from .rules.registry import Rule


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
            self._index(graph)

    def _index(self, graph: onnx.GraphProto) -> None:
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
            where = f"node '{self.node.name}', {self.node.op_type}" if self.node is not None else "no node"
            raise ModelError(f"rank of tensor '{name}' is unknown ({where}); "
                             f"shape inference could not determine it")
        return len(s)

    def declare(self, name: str, shape: list[Dim] | None, dtype: int | None = None) -> None:
        """Record the shape (and element type) of a tensor a rule made, for the rules it feeds."""
        self._shapes[name] = shape
        if dtype is not None:
            self._dtypes[name] = dtype

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

    def attr(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
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

    # the reverse walk ------------------------------------------------------------------
    def walk(self, active: list, cot: dict[str, list[str]]) -> dict[str, str]:
        """Run the rules over the active nodes in reverse order, adding each input's cotangent
        terms to ``cot``; return the cotangents of the wrt tensors that active nodes compute."""
        b, final = self.b, {}
        for node in reversed(active):
            dys = []
            for o in node.output:
                terms = cot.pop(o, None) if o else None
                dys.append(b.accumulate(terms, o) if terms else None)
                if o in self.wrt and dys[-1] is not None:
                    final[o] = dys[-1]
            if all(d is None for d in dys):
                continue
            self.node = node
            fused = fusion.gradient(self, node, dys)
            if fused is not None:  # the nodes between x and this one get no cotangent
                x, dx = fused
                if dx is not None:
                    cot.setdefault(x, []).append(dx)
                continue
            grads = self.rules[node.op_type].fn(self, node, dys)
            for name, gname in zip(effective_inputs(node), grads):
                if name and gname is not None and self.needs_grad(name):
                    cot.setdefault(name, []).append(gname)
        return final

    def branch_gradient(self, g: onnx.GraphProto, dys: list, wanted: list[str]) -> onnx.GraphProto:
        """A graph with no inputs that recomputes branch ``g`` and returns the cotangents of the
        outer tensors ``wanted`` (fresh output names) given the cotangents ``dys`` of g's outputs."""
        shapes, dtypes, consts, shape_values = self.facts()
        collect_static(g, shapes, dtypes)
        consts.update(collect_consts(g))
        shape_values.update(fold_static(g, self.opset, shapes, consts))
        targets = [vi.name for vi, dy in zip(g.output, dys) if dy is not None]
        active, need = active_path(g, wanted, targets, dtypes)
        check_rules(active, self.rules, g)
        b = self.b.child()
        sub = Context(b, shapes, dtypes, consts, need, self.ruleset, self.options,
                      graph=g, rules=self.rules, wrt=wanted, shape_values=shape_values)
        cot: dict[str, list[str]] = {}
        for vi, dy in zip(g.output, dys):
            if dy is not None:
                cot.setdefault(vi.name, []).append(dy)
        sub.walk(active, cot)
        outs = []
        for w in wanted:
            terms = cot.get(w)
            grad = b.accumulate(terms, w) if terms else b.zeros_cot(w, dtypes.get(w, TensorProto.FLOAT))
            outs.append(b.op("Identity", [grad], hint="branch_grad"))
        wanted_names = set(outs)
        nodes = live(copy.deepcopy(list(g.node)) + b.nodes, wanted_names)
        return helper.make_graph(
            nodes, b.fresh(g.name or "branch") + "_grad", [],
            [helper.make_tensor_value_info(o, dtypes.get(w, TensorProto.FLOAT), None) for o, w in zip(outs, wanted)],
            [copy.deepcopy(t) for t in g.initializer if t.name in wanted_names])
