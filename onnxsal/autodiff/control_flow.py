"""Control flow (If, Loop, Scan) in the gradient pass.

A subgraph may read tensors of the graphs around it by name (exporters write ``torch.cond``
and scripted branches that way), so a node's dependencies are its inputs plus the names its
subgraphs read from outside: :func:`effective_inputs`, which every walk over the graph uses.

* ``If`` with a condition known before the run (a constant, or folded from static shapes) is
  replaced by the taken branch (:func:`inline_static_ifs`), renamed apart.
* ``If`` with a run-time condition has a rule (:func:`.rules.branches.if_rule`). Decision: a backward ``If``
  on the same condition whose branches are the differentiated branch bodies, rather than a
  rewrite into Where(cond, then, else), which would run both branches and lets an untaken
  branch's inf or NaN leak into the gradient (0 * inf). Each backward branch recomputes its
  forward body (the forward branch's tensors are not visible outside its If), then runs the
  ordinary rules over it and returns the cotangents of the outer tensors the If reads, zeros
  for those that branch does not read. Only the taken branch runs, forward and backward.
* ``Loop`` and ``Scan`` have no rule: on the path from the input to the logits the pass names
  them (UnsupportedOperatorError); off it (shape computations) they run as they are.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import onnx
from onnx import AttributeProto, helper

from ..onnx_util import all_names, subgraphs  # noqa: F401  (re-exported: control_flow.walk's users)

GRAPH_ATTRS = (AttributeProto.GRAPH, AttributeProto.GRAPHS)


def defined(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    return names | {o for n in graph.node for o in n.output if o}


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names the graph (and the subgraphs inside it) reads from enclosing graphs, in order."""
    own = defined(graph)
    reads = [i for n in graph.node for i in effective_inputs(n)] + [o.name for o in graph.output]
    return [r for r in dict.fromkeys(reads) if r and r not in own]


def effective_inputs(node: onnx.NodeProto) -> list[str]:
    """The node's inputs, then the outer names its subgraphs read (each once)."""
    if not any(a.type in GRAPH_ATTRS for a in node.attribute):
        return list(node.input)
    extra = [r for g in subgraphs(node) for r in outer_reads(g)]
    return list(node.input) + [r for r in dict.fromkeys(extra) if r not in node.input]


def walk(nodes: Iterable[onnx.NodeProto]):
    """Every node, and the nodes of its subgraphs (recursively)."""
    for n in nodes:
        yield n
        for g in subgraphs(n):
            yield from walk(g.node)


def live(nodes: Sequence[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in topological order) that a name in ``wanted`` depends on; ``wanted``
    grows by the effective inputs of the kept nodes."""
    keep = [False] * len(nodes)
    for k in range(len(nodes) - 1, -1, -1):
        if any(o in wanted for o in nodes[k].output):
            keep[k] = True
            wanted.update(effective_inputs(nodes[k]))
    return [n for n, k in zip(nodes, keep) if k]



# -- If with a condition known before the run -------------------------------------------------

def _rename_reads(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename the outer names a nested subgraph reads (no subgraph may redefine them)."""
    for n in graph.node:
        for k, i in enumerate(n.input):
            n.input[k] = names.get(i, i)
        for g in subgraphs(n):
            _rename_reads(g, names)
    for o in graph.output:
        o.name = names.get(o.name, o.name)


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto, taken: set[str]) -> tuple[list, list]:
    """(nodes, initializers) computing the If's outputs by the branch, every name made fresh."""
    def fresh(name):
        k, new = 0, name
        while new in taken:
            k += 1
            new = f"{name}_inl{k}"
        taken.add(new)
        return new

    branch = copy.deepcopy(branch)
    names = {t: fresh(t) for t in defined(branch)}
    inits = []
    for t in branch.initializer:
        t.name = names[t.name]
        inits.append(t)
    for n in branch.node:
        n.name = fresh(n.name or f"{node.name}_inl")
    _rename_reads(branch, names)
    for n in branch.node:
        for k, o in enumerate(n.output):
            n.output[k] = names.get(o, o)
    out = list(branch.node)
    for vi, y in zip(branch.output, node.output):
        if y:
            out.append(helper.make_node("Identity", [vi.name], [y], name=fresh(f"{node.name}_out")))
    return out, inits


def inline_static_ifs(graph: onnx.GraphProto, consts: dict) -> bool:
    """Replace each If of ``graph`` whose condition is in ``consts`` by its taken branch;
    return whether any was replaced."""
    static = [n for n in graph.node if n.op_type == "If" and n.domain in ("", "ai.onnx")
              and n.input and n.input[0] in consts and consts[n.input[0]].size == 1]
    if not static:
        return False
    taken = all_names(graph)
    nodes = []
    for n in graph.node:
        if any(n is s for s in static):
            attr = "then_branch" if bool(consts[n.input[0]].reshape(())) else "else_branch"
            body, inits = _inline(n, next(a.g for a in n.attribute if a.name == attr), taken)
            nodes.extend(body)
            graph.initializer.extend(inits)
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    return True
