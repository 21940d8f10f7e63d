"""Fuzz ``onnxsal inspect``, ``augment`` and ``explain`` with mutated ONNX files.

Each case takes one of a few small, valid classifiers (built here with onnx.helper), applies
one to three mutations (bit flips, truncations, spliced bytes, shape lies, cycles, dangling
names, duplicate names, wrong element types, swapped operators, bad attributes, deleted or
duplicated nodes, missing initializers, odd opsets, garbage metadata, a node moved into an
If/Loop body that reads outer tensors, sparse tensors with inline or external data inside,
outside or linked out of the folder, fake augmented-model metadata) and runs the three
commands through ``onnxsal.cli.main`` exactly as the console script does. Allowed outcomes:
exit 0, or exit 2 with exactly one ``error:`` line and no traceback (an OnnxsalError). Anything
else is a finding: another exception, another exit code, several error lines, a hang, or a
crash of the process (caught because cases run in a worker subprocess that is restarted after
a crash). Case ``i`` depends only on ``(seed, i)``, so findings reproduce with ``--only i``.

    python benchmarks/fuzz.py --cases 2000 --seed 0          # prints cases and findings
    python benchmarks/fuzz.py --cases 300 --no-figures       # what tests/test_fuzz.py runs
    python benchmarks/fuzz.py --only 17 --keep DIR            # one case, its file kept in DIR
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

COMMANDS = ("inspect", "augment", "explain")
EXPLAIN_METHODS = "vanilla,active,gradcam"
CASE_TIMEOUT = 120.0  # seconds for the three commands of one case
MEMORY_LIMIT = 6 << 30  # address-space limit of the worker: a runaway allocation fails instead


# ---------------------------------------------------------------------------------------------
# base models


def _init(rng, name, shape, scale=0.4):
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def base_models() -> list[onnx.ModelProto]:
    """Three small valid classifiers covering the common operators and both layouts."""
    rng = np.random.default_rng(0)
    out = []
    # A: conv net with a residual add, max pool, Gemm head and a final Softmax (NCHW, opset 17)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a2"], name="residual"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    inits = [_init(rng, "W1", (4, 3, 3, 3)), _init(rng, "B1", (4,)), _init(rng, "W2", (4, 4, 3, 3)),
             _init(rng, "B2", (4,)), _init(rng, "Wf", (5, 4)), _init(rng, "Bf", (5,))]
    g = helper.make_graph(nodes, "resnetish",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])], inits)
    out.append(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    # B: NHWC grey input, BatchNormalization, Reshape + MatMul head (opset 13)
    nodes = [
        helper.make_node("Transpose", ["img"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "Wc"], ["c"], name="conv", pads=[0, 0, 0, 0], strides=[2, 2],
                         kernel_shape=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Sigmoid", ["bn"], ["sg"], name="sig"),
        helper.make_node("Mul", ["bn", "sg"], ["swish"], name="swish"),
        helper.make_node("Reshape", ["swish", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "Wm"], ["mm"], name="head"),
        helper.make_node("Add", ["mm", "bm"], ["out"], name="head_bias"),
    ]
    inits = [_init(rng, "Wc", (3, 1, 2, 2)), _init(rng, "s", (3,)), _init(rng, "b", (3,)),
             _init(rng, "m", (3,)),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "v"),
             numpy_helper.from_array(np.array([-1, 48], np.int64), "shape"),
             _init(rng, "Wm", (48, 3)), _init(rng, "bm", (3,))]
    g = helper.make_graph(nodes, "nhwc",
                          [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["B", 8, 8, 1])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 3])], inits)
    out.append(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    # C: fixed batch of 1, average pool, Clip, LogSoftmax (opset 11)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["cl"], name="clip"),
        helper.make_node("AveragePool", ["cl"], ["ap"], name="avg", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["ap"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "Wf"], ["z"], name="fc"),
        helper.make_node("LogSoftmax", ["z"], ["logp"], name="logsoftmax", axis=1),
    ]
    inits = [_init(rng, "W", (2, 3, 3, 3)), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi"), _init(rng, "Wf", (8, 4))]
    g = helper.make_graph(nodes, "fixed",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("logp", TensorProto.FLOAT, [1, 4])], inits)
    out.append(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)]))
    for m in out:
        m.ir_version = 8
        onnx.checker.check_model(m)
    return out


# ---------------------------------------------------------------------------------------------
# mutations: each takes (rng, model) and returns a model, or bytes for byte-level mutations

OPS = ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Softmax", "Identity",
       "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Conv", "ConvTranspose", "MaxPool",
       "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Concat", "Slice",
       "Gather", "Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum", "BatchNormalization",
       "Dropout", "Erf", "Sin", "LSTM", "Loop", "If", "Resize", "TopK", "NonZero", "Unique",
       "Cast", "Shape", "Expand", "Tile", "Pad", "Einsum", "Where", "Max", "Min", "Foo", ""]
TYPES = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
         TensorProto.INT32, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING,
         TensorProto.BFLOAT16, TensorProto.COMPLEX64, 0, 99]


def _names(m):
    return [t for n in m.graph.node for t in list(n.input) + list(n.output) if t]


def bit_flips(rng, m):
    b = bytearray(m.SerializeToString())
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def truncate(rng, m):
    b = m.SerializeToString()
    return b[: int(rng.integers(0, len(b)))]


def splice(rng, m):
    b = bytearray(m.SerializeToString())
    i, j = sorted(int(v) for v in rng.integers(0, len(b), 2))
    what = int(rng.integers(3))
    if what == 0:  # repeat a chunk
        b[i:i] = b[i:j][:200]
    elif what == 1:  # random bytes
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
    else:  # delete a chunk
        del b[i:j][:200]
    return bytes(b)


def shape_lie(rng, m):
    vis = list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
    vi = vis[int(rng.integers(len(vis)))]
    dims = vi.type.tensor_type.shape.dim
    what = int(rng.integers(4))
    if what == 0 and len(dims):
        d = dims[int(rng.integers(len(dims)))]
        v = int(rng.choice([0, 1, 2, 5, 7, 1000, 1 << 20, -1, -7]))
        if v < 0:
            d.dim_param = "?"
        else:
            d.dim_value = v
    elif what == 1:
        vi.type.tensor_type.shape.dim.add().dim_value = int(rng.integers(1, 4))
    elif what == 2 and len(dims):
        del dims[int(rng.integers(len(dims)))]
    else:  # an initializer's dims that its data does not fill (or overfills)
        t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        if len(t.dims):
            t.dims[int(rng.integers(len(t.dims)))] = int(rng.choice([0, 1, 3, 1 << 30]))
    return m


def cycle(rng, m):
    nodes = m.graph.node
    if len(nodes) < 2:
        return m
    i = int(rng.integers(0, len(nodes) - 1))
    j = int(rng.integers(i + 1, len(nodes)))
    if len(nodes[i].input):
        nodes[i].input[int(rng.integers(len(nodes[i].input)))] = nodes[j].output[0]
    if rng.random() < 0.5:  # also re-sort so that the checker's order test passes
        order = list(nodes)
        order[i], order[j] = order[j], order[i]
        del nodes[:]
        nodes.extend(order)
    return m


def dangling(rng, m):
    n = m.graph.node[int(rng.integers(len(m.graph.node)))]
    what = int(rng.integers(3))
    if what == 0 and len(n.input):
        n.input[int(rng.integers(len(n.input)))] = "nowhere_" + str(int(rng.integers(100)))
    elif what == 1:
        m.graph.output[0].name = "no_such_output"
    else:
        n.output[0] = "renamed_" + str(int(rng.integers(100)))
    return m


def duplicate_names(rng, m):
    names = _names(m)
    what = int(rng.integers(4))
    nodes = m.graph.node
    if what == 0:
        nodes[int(rng.integers(len(nodes)))].output[0] = names[int(rng.integers(len(names)))]
    elif what == 1 and len(nodes) > 1:
        nodes[1].name = nodes[0].name or "dup"
        nodes[0].name = nodes[1].name
    elif what == 2:
        t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        m.graph.initializer.append(t)
    else:
        m.graph.input.append(m.graph.input[0])
    return m


def wrong_type(rng, m):
    what = int(rng.integers(4))
    ty = int(rng.choice(TYPES))
    if what == 0:
        m.graph.input[0].type.tensor_type.elem_type = ty
    elif what == 1:
        m.graph.output[0].type.tensor_type.elem_type = ty
    elif what == 2:
        t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        t.data_type = ty
    else:  # a Cast in the middle of the graph
        i = int(rng.integers(len(m.graph.node)))
        n = m.graph.node[i]
        src = n.input[0] if len(n.input) else None
        if src:
            cast = helper.make_node("Cast", [src], [src + "_cast"], to=ty, name="fuzz_cast")
            n.input[0] = src + "_cast"
            m.graph.node.insert(i, cast)
    return m


def swap_op(rng, m):
    n = m.graph.node[int(rng.integers(len(m.graph.node)))]
    n.op_type = str(rng.choice(OPS))
    if rng.random() < 0.2:
        n.domain = str(rng.choice(["com.microsoft", "ai.onnx.ml", "evil", "ai.onnx"]))
    return m


def bad_attribute(rng, m):
    cands = [(n, a) for n in m.graph.node for a in n.attribute]
    if not cands:
        return m
    n, a = cands[int(rng.integers(len(cands)))]
    v = int(rng.choice([0, -1, -3, 1, 2, 3, 64, 1 << 31, -(1 << 40)]))
    if a.type == onnx.AttributeProto.INT:
        a.i = v
    elif a.type == onnx.AttributeProto.INTS and len(a.ints):
        a.ints[int(rng.integers(len(a.ints)))] = v
        if rng.random() < 0.3:
            a.ints.append(v)
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = float(rng.choice([0.0, -1.0, np.nan, np.inf, 1e30]))
    if rng.random() < 0.3:  # an attribute the op does not have
        n.attribute.append(helper.make_attribute("bogus", v))
    return m


def delete_node(rng, m):
    del m.graph.node[int(rng.integers(len(m.graph.node)))]
    return m


def duplicate_node(rng, m):
    i = int(rng.integers(len(m.graph.node)))
    n = onnx.NodeProto()
    n.CopyFrom(m.graph.node[i])
    m.graph.node.insert(i + 1, n)
    return m


def drop_initializer(rng, m):
    del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
    return m


def odd_opset(rng, m):
    m.opset_import[0].version = int(rng.choice([1, 6, 7, 9, 10, 12, 14, 18, 21, 23, 28, 29, 1000]))
    if rng.random() < 0.3:
        m.ir_version = int(rng.choice([0, 1, 3, 7, 11, 15, 100]))
    if rng.random() < 0.2:
        del m.opset_import[:]
    return m


UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Abs", "Neg", "Erf", "Sin",
         "Reciprocal", "Softplus", "Elu", "LeakyRelu", "HardSigmoid", "Identity", "Floor", "Sign"]


def swap_unary(rng, m):
    """A same-arity operator swap the checker cannot catch (some have no gradient rule)."""
    cands = [n for n in m.graph.node if n.op_type in UNARY or n.op_type in ("Add", "Sub", "Mul", "Div")]
    if not cands:
        return m
    n = cands[int(rng.integers(len(cands)))]
    if n.op_type in UNARY:
        n.op_type = str(rng.choice(UNARY))
    else:
        n.op_type = str(rng.choice(["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"]))
    del n.attribute[:]
    return m


def weird_weights(rng, m):
    """NaN, Inf, huge or zero weights: logits or gradients that are not finite."""
    t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
    if t.data_type != TensorProto.FLOAT:
        return m
    a = numpy_helper.to_array(t).copy()
    a.flat[int(rng.integers(a.size)) if a.size else 0:] = np.float32(rng.choice([np.nan, np.inf, -np.inf, 3e38, 0.0]))
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m


def extra_output(rng, m):
    """Several outputs: an intermediate tensor, a duplicate, or an integer one."""
    names = [o for n in m.graph.node for o in n.output]
    what = int(rng.integers(3))
    if what == 0:
        m.graph.output.append(helper.make_empty_tensor_value_info(names[int(rng.integers(len(names)))]))
    elif what == 1:
        m.graph.output.append(m.graph.output[0])
    else:
        n = helper.make_node("Shape", [m.graph.input[0].name], ["fuzz_shape"])
        m.graph.node.append(n)
        m.graph.output.append(helper.make_tensor_value_info("fuzz_shape", TensorProto.INT64, [4]))
    return m


def garbage_metadata(rng, m):
    key = str(rng.choice(["onnxsal.preprocess", "onnxsal.labels"]))
    val = str(rng.choice(['{"scale": 0}', '{"mean": [1, 2, 3, 4, 5]}', '{"layout": "X"}', "[",
                          '{"size": [0, 0]}', '{"std": [0]}', '["a"]', "null", '{"bgr": true}',
                          '{"size": [100000, 100000]}', '{"scale": 1e400}']))
    helper.set_model_props(m, {key: val})
    return m



def subgraph(rng, m):
    """One node moved into an If's branches or a one-trip Loop's body, which read the outer
    tensors it used (the control-flow scoping the gradient pass must follow)."""
    k = int(rng.integers(len(m.graph.node)))
    n = m.graph.node[k]
    if len(n.output) != 1 or not n.input:
        return m
    out = n.output[0]
    cond = helper.make_tensor("fuzz_true", TensorProto.BOOL, [], [True])
    inner = onnx.NodeProto()
    inner.CopyFrom(n)
    if rng.random() < 0.5:
        inner.output[0] = "fuzz_b"
        body = helper.make_graph([inner], "fuzz_branch", [],
                                 [helper.make_tensor_value_info("fuzz_b", TensorProto.FLOAT, None)])
        wrapped = helper.make_node("If", ["fuzz_true"], [out], then_branch=body, else_branch=body)
    else:  # the node's first input is the loop-carried value; the others are read from outside
        inner.input[0], inner.output[0] = "fuzz_v", "fuzz_v_out"
        body = helper.make_graph(
            [helper.make_node("Identity", ["fuzz_c"], ["fuzz_c_out"]), inner], "fuzz_body",
            [helper.make_tensor_value_info("fuzz_i", TensorProto.INT64, []),
             helper.make_tensor_value_info("fuzz_c", TensorProto.BOOL, []),
             helper.make_tensor_value_info("fuzz_v", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("fuzz_c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("fuzz_v_out", TensorProto.FLOAT, None)])
        m.graph.initializer.append(helper.make_tensor("fuzz_trips", TensorProto.INT64, [], [1]))
        wrapped = helper.make_node("Loop", ["fuzz_trips", "fuzz_true", n.input[0]], [out], body=body)
    m.graph.initializer.append(cond)
    m.graph.node[k].CopyFrom(wrapped)
    return m


# external-data locations of the sparse mutation: a file beside the model (written by the
# worker), missing, outside, absolute, and a link inside the folder to a file outside it
SPARSE_LOCATIONS = ["weights.bin", "missing.bin", "../outside.bin", "/etc/hostname", "link.bin"]


def sparse(rng, m):
    """A float initializer stored sparse (a sparse initializer, or a Constant's sparse_value),
    its values inline or external (SPARSE_LOCATIONS), sometimes with a lying dense shape."""
    floats = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT]
    if not floats:
        return m
    t = floats[int(rng.integers(len(floats)))]
    a = numpy_helper.to_array(t)
    nz = np.flatnonzero(a)
    values = numpy_helper.from_array(a.reshape(-1)[nz].astype(np.float32), t.name)
    if rng.random() < 0.5:
        values.ClearField("raw_data")
        values.data_location = TensorProto.EXTERNAL
        loc = str(rng.choice(SPARSE_LOCATIONS))
        for key, v in (("location", loc), ("offset", str(int(rng.choice([0, 0, 4, 1 << 40])))),
                       ("length", str(4 * len(nz)))):
            e = values.external_data.add()
            e.key, e.value = key, v
    dims = list(a.shape) if rng.random() < 0.8 else [int(rng.choice([1 << 20, 0, 3]))] * max(a.ndim, 1)
    st = helper.make_sparse_tensor(values, numpy_helper.from_array(nz.astype(np.int64), t.name + "_idx"), dims)
    m.graph.initializer.remove(t)
    if rng.random() < 0.5:
        m.graph.sparse_initializer.append(st)
    else:
        m.graph.node.insert(0, helper.make_node("Constant", [], [t.name], sparse_value=st))
    return m


def fake_augmented(rng, m):
    """onnxsal's augmented-model metadata (seed, logits, gradients) on a plain file, naming
    tensors that exist, do not, or are the wrong ones; or deep, huge or odd JSON values."""
    names = [m.graph.input[0].name, m.graph.output[0].name] + _names(m) + ["nope", ""]
    pick = lambda: str(names[int(rng.integers(len(names)))])  # noqa: E731
    what = int(rng.integers(3))
    if what == 0:
        props = {"onnxsal.seed": pick(), "onnxsal.logits": pick(), "onnxsal.grad." + pick(): pick()}
        if rng.random() < 0.5:
            props["onnxsal.rules"] = str(rng.choice(["default", "zzz", ""]))
    elif what == 1:
        depth = int(rng.choice([50, 5000, 200000]))
        props = {str(rng.choice(["onnxsal.preprocess", "onnxsal.labels", "onnxsal.seed"])):
                 "[" * depth + "]" * depth}
    else:
        props = {str(rng.choice(["onnxsal.labels", "onnxsal.preprocess"])):
                 json.dumps(["x" * 1000] * int(rng.choice([10, 5000])))}
    helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, **props})
    return m

MUTATIONS = {
    "bit_flips": bit_flips, "truncate": truncate, "splice": splice, "shape_lie": shape_lie,
    "cycle": cycle, "dangling": dangling, "duplicate_names": duplicate_names,
    "wrong_type": wrong_type, "swap_op": swap_op, "bad_attribute": bad_attribute,
    "delete_node": delete_node, "duplicate_node": duplicate_node,
    "drop_initializer": drop_initializer, "odd_opset": odd_opset,
    "garbage_metadata": garbage_metadata, "swap_unary": swap_unary,
    "weird_weights": weird_weights, "extra_output": extra_output,
    "subgraph": subgraph, "sparse": sparse, "fake_augmented": fake_augmented,
}
MILD = ["shape_lie", "wrong_type", "bad_attribute", "odd_opset", "garbage_metadata", "swap_unary",
        "weird_weights", "extra_output", "subgraph", "sparse", "fake_augmented"]
STRUCTURAL = [k for k in MUTATIONS if k not in ("bit_flips", "truncate", "splice")]


def make_case(seed: int, i: int, bases: list[onnx.ModelProto]) -> tuple[bytes, list[str]]:
    """The bytes of case i and the names of the mutations applied (structural ones first,
    then at most one byte-level one)."""
    rng = np.random.default_rng([seed, i])
    m = onnx.ModelProto()
    m.CopyFrom(bases[int(rng.integers(len(bases)))])
    r = rng.random()
    if r < 0.45:  # one mutation the checker may let through: these reach the pass and the engine
        picked = [str(rng.choice(MILD))]
    elif r < 0.75:
        picked = [str(rng.choice(STRUCTURAL)) for _ in range(int(rng.integers(1, 4)))]
    else:
        picked = [str(rng.choice(STRUCTURAL)), str(rng.choice(["bit_flips", "truncate", "splice"]))]
    applied = []
    for name in picked:
        try:
            got = MUTATIONS[name](rng, m)
        except Exception:  # a mutation that does not apply to this graph shape
            continue
        applied.append(name)
        if isinstance(got, bytes):
            return got, applied
        m = got
    try:
        return m.SerializeToString(), applied
    except Exception:  # a mutation protobuf itself refuses to serialise
        return b"", applied + ["(unserialisable: empty file)"]


# ---------------------------------------------------------------------------------------------
# running the CLI in-process, as the console script does


def run_cli(args: list[str]) -> tuple[object, str]:
    """(exit code, or 'exception <Type>: msg' when something escaped main(); stderr text)."""
    from onnxsal import cli

    err, out = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["onnxsal"] + list(args)
    code: object = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.main()
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
    except BaseException as exc:  # noqa: BLE001 - the point is to see everything
        code = f"exception {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        sys.argv = old
    return code, err.getvalue()


def judge(code: object, stderr: str) -> str | None:
    """None when the outcome is allowed, else what is wrong."""
    if isinstance(code, str):
        return code
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    other = [ln for ln in lines if not ln.startswith(("error:", "note:", "failed:"))]
    if "Traceback" in stderr:
        return "traceback printed"
    if code == 0:
        return None
    if code != 2:
        return f"exit code {code}: {' | '.join(lines)[:300]}"
    if len(errors) != 1 or other:
        return f"{len(errors)} error lines and {len(other)} others: {' | '.join(lines)[:300]}"
    return None


def worker(seed: int, indices: list[int], workdir: Path, progress: Path, figures: bool = True) -> None:
    """Run cases in this process; one JSON line per case (and a 'start' line before it, so
    that the parent can name the case that crashed the process). ``figures=False`` skips
    explain's matplotlib figures (most of its time on these tiny models)."""
    if not figures:
        import onnxsal.explain

        onnxsal.explain.render = lambda *a, **k: None
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):
        pass
    from skimage import io as skio

    models = workdir / "models"  # the cases' folder, with the files SPARSE_LOCATIONS name
    models.mkdir(exist_ok=True)
    (models / "weights.bin").write_bytes(np.zeros(1 << 16, np.float32).tobytes())
    (workdir / "outside.bin").write_bytes(b"outside the model's folder\n" * 64)
    if not (models / "link.bin").is_symlink():
        os.symlink(workdir / "outside.bin", models / "link.bin")
    image = workdir / "image.png"
    if not image.exists():
        skio.imsave(image, (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8),
                    check_contrast=False)
    os.environ["ONNXSAL_CACHE"] = str(workdir / "cache")
    bases = base_models()
    with open(progress, "a", encoding="utf-8") as log:
        for i in indices:
            data, applied = make_case(seed, i, bases)
            path = models / f"case{i}.onnx"
            path.write_bytes(data)
            log.write(json.dumps({"start": i}) + "\n")
            log.flush()
            rec = {"case": i, "mutations": applied, "bytes": len(data), "outcomes": {},
                   "findings": {}}
            for cmd in COMMANDS:
                args = {"inspect": ["inspect", str(path)],
                        "augment": ["augment", str(path), "-o", str(workdir / "aug.onnx")],
                        "explain": ["explain", str(path), str(image), "--out",
                                    str(workdir / "explained"), "-m", EXPLAIN_METHODS,
                                    "--device", "cpu"]}[cmd]
                code, stderr = run_cli(args)
                bad = judge(code, stderr)
                first = next((ln for ln in stderr.splitlines() if ln.startswith("error:")), "")
                first = first.replace(str(path), "<model>")
                rec["outcomes"][cmd] = "ok" if code == 0 else (first[7:][:160] or str(code)[:160])
                if bad:
                    rec["findings"][cmd] = bad
            path.unlink()
            log.write(json.dumps(rec) + "\n")
            log.flush()


def _watch(proc: subprocess.Popen, progress: Path) -> float:
    """Wait for the worker; kill it when one case runs longer than CASE_TIMEOUT. Returns the
    time the last case started."""
    last_seen, last_time = None, time.time()
    while proc.poll() is None:
        time.sleep(0.2)
        started = [r["start"] for r in _read(progress) if "start" in r]
        if started and started[-1] != last_seen:
            last_seen, last_time = started[-1], time.time()
        if last_seen is not None and time.time() - last_time > CASE_TIMEOUT:
            proc.kill()
            proc.wait()
            break
    return last_time


def _run_worker(left: list[int], seed: int, work: Path, progress: Path, figures: bool,
                todo: list[int], done: dict[int, dict]) -> None:
    """One worker subprocess over the cases ``left``; records each finished case in ``done``
    and, when the worker died or hung, the case it was on as a process finding."""
    cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--workdir", str(work),
           "--progress", str(progress), "--only", ",".join(map(str, left))]
    if not figures:
        cmd.append("--no-figures")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last_time = _watch(proc, progress)
    stderr_tail = (proc.stderr.read() if proc.stderr else "")[-500:]
    recs = _read(progress)
    for r in recs:
        if "case" in r:
            done[r["case"]] = r
    started = [r["start"] for r in recs if "start" in r]
    if proc.returncode != 0 or any(i not in done for i in started):
        culprit = next((i for i in reversed(started) if i not in done), None)
        if culprit is None:
            culprit = next(i for i in todo if i not in done)
        hung = time.time() - last_time > CASE_TIMEOUT
        done[culprit] = {"case": culprit, "mutations": [], "outcomes": {},
                         "findings": {"process": ("hang (> %d s)" % CASE_TIMEOUT) if hung else
                                      f"worker died (exit {proc.returncode}): "
                                      f"{' '.join(stderr_tail.split())[-300:]}"}}


def _summary(records: list[dict], seed: int, figures: bool, seconds: float) -> dict:
    outcome: Counter = Counter()
    for r in records:
        for cmd, o in r["outcomes"].items():
            outcome[(cmd, "ok" if o == "ok" else "error")] += 1
    return {"cases": len(records), "seed": seed, "figures": figures, "seconds": round(seconds, 1),
            "runs": sum(len(r["outcomes"]) for r in records),
            "outcomes": {f"{c} {k}": v for (c, k), v in sorted(outcome.items())},
            "mutations": dict(Counter(m for r in records for m in r["mutations"])),
            "findings": [r for r in records if r["findings"]]}


def _print(records: list[dict], summary: dict) -> None:
    for r in records:
        flag = "FINDING" if r["findings"] else ""
        print(f"case {r['case']:5d} {'+'.join(r['mutations']) or '-':<40} "
              + "  ".join(f"{c}: {str(o)[:50]}" for c, o in r["outcomes"].items()) + f" {flag}")
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}, indent=1))
    print(f"{len(summary['findings'])} findings")
    for r in summary["findings"]:
        print(f"  case {r['case']} ({'+'.join(r['mutations'])}): {r['findings']}")


def run(cases: int, seed: int = 0, only: list[int] | None = None, keep: Path | None = None,
        verbose: bool = True, figures: bool = True) -> dict:
    """Run the cases in worker subprocesses; return {"cases", "findings", "outcomes", ...}."""
    todo = list(only) if only else list(range(cases))
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="onnxsal-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    progress = work / "progress.jsonl"
    progress.write_text("")
    done: dict[int, dict] = {}
    t0 = time.time()
    while left := [i for i in todo if i not in done]:
        _run_worker(left, seed, work, progress, figures, todo, done)
    records = [done[i] for i in todo]
    summary = _summary(records, seed, figures, time.time() - t0)
    if verbose:
        _print(records, summary)
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return summary


def _read(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated case numbers")
    ap.add_argument("--keep", default=None, help="work folder to keep (case files of findings)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-figures", action="store_true", help="skip explain's figures (faster)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    only = [int(v) for v in a.only.split(",") if v] if a.only else None
    if a.worker:
        worker(a.seed, only or [], Path(a.workdir), Path(a.progress), figures=not a.no_figures)
        return
    summary = run(a.cases, a.seed, only, Path(a.keep) if a.keep else None, verbose=not a.quiet,
                  figures=not a.no_figures)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    sys.exit(1 if summary["findings"] else 0)


if __name__ == "__main__":
    main()
