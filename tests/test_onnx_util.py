"""onnxsal/onnx_util.py: attributes with schema defaults, graph indexes, names, IR cap, sessions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsal import onnx_util as u


def _model(opset: int = 17, ir: int | None = None) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "c"], ["sq"], name="sq"),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2), "k")),
             helper.make_node("Add", ["sq", "k"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    return m


def test_attributes_take_the_schema_defaults_for_the_opset():
    m = _model()
    conv = m.graph.node[0]
    assert u.attributes(conv) == {"pads": [1, 1, 1, 1]}
    full = u.attributes(conv, u.opset_of(m))
    assert full["pads"] == [1, 1, 1, 1] and full["group"] == 1 and full["auto_pad"] == b"NOTSET"
    assert "kernel_shape" not in full  # no default in the schema: stays absent
    assert u.attribute(conv, "strides", 17, default="none") == "none"
    assert u.attribute(helper.make_node("NoSuchOp", [], []), "x", 17, default=3) == 3


def test_graph_indexes():
    g = _model().graph
    assert u.producers(g)["sq"].name == "sq"
    assert [n.name for n in u.consumers(g)["c"]] == ["sq", "sq"]  # once per input slot
    assert sorted(u.constants(g)) == ["k", "w"]


def test_fresh_names_avoid_subgraph_names():
    m = _model()
    body = helper.make_graph([helper.make_node("Identity", ["y"], ["p_t_1"])], "b", [],
                             [helper.make_tensor_value_info("p_t_1", TensorProto.FLOAT, None)])
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body))
    taken = u.all_names(m.graph)
    assert {"x", "w", "k", "conv", "p_t_1", "cond"} <= taken and "" not in taken
    fresh = u.name_allocator(taken, "p_")
    assert fresh("t") == "p_t_1_" and fresh("t") == "p_t_2" and "p_t_2" in taken


def test_ir_version_is_capped_and_raised_to_the_opsets_need():
    assert u.ir_version_for(_model(17, ir=13)) == u.MAX_IR_VERSION
    assert u.ir_version_for(_model(17, ir=3)) == helper.find_min_ir_version_for([helper.make_opsetid("", 17)])
    assert u.ir_version_for(_model(13, ir=0)) == u.MAX_IR_VERSION


def test_quiet_cpu_session_runs_the_model(capfd):
    m = u.set_ir_version(_model())
    x = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    (y,) = u.cpu_session(m, threads=1).run(None, {"x": x})
    w = np.ones((3, 3), np.float32)
    pad = np.pad(x[0, 0], 1)
    c = np.array([[(pad[i:i + 3, j:j + 3] * w).sum() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y[0, 0], c * c + 2, rtol=1e-5)
    assert u.quiet_options().log_severity_level == 4
