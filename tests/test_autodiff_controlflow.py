"""Control flow whose subgraphs read tensors of the enclosing graph (If, Loop, Scan).

Oracles: central finite differences in float64 on onnxruntime's run of the forward model, and
torch autograd of the same math for a real ``torch.cond`` export. Every If model is checked
with its run-time condition true and false.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.autodiff import augment
from onnxsal.autodiff.control_flow import effective_inputs
from onnxsal.errors import UnsupportedOperatorError

from conftest import run_augmented

D = TensorProto.DOUBLE


def _w(name, shape, seed, dtype=np.float64):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(dtype), name)


def _branch(name, nodes, out, elem=D):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, elem, None)])


def _model(nodes, inits, batch="N", elem=D, shape=(4,), classes=3):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [batch, *shape])],
                          [helper.make_tensor_value_info("y", elem, [batch, classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _cond(op="ReduceMean", t=0.0, out="c"):
    """out = op(x) > t: a condition computed from the image at run time."""
    return [helper.make_node(op, ["x"], [out + "_v"], keepdims=0),
            helper.make_node("Greater", [out + "_v", out + "_t"], [out])], [
        numpy_helper.from_array(np.array(t, np.float64), out + "_t")]


def fd_jacobian(model, x, h=1e-6):
    """[C] + x.shape: d(sum over the batch of logit k)/dx by central differences."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    f = lambda v: sess.run(None, {"x": v})[0]  # noqa: E731
    classes = f(x).shape[-1]
    jac = np.zeros((classes,) + x.shape)
    for j in range(x.size):
        p, q = x.copy(), x.copy()
        p.flat[j] += h
        q.flat[j] -= h
        col = (f(p) - f(q)) / (2 * h)
        jac.reshape(classes, -1)[:, j] = col.reshape(-1, classes).sum(0)
    return jac


def pass_gradient(model, x):
    aug = augment(model, wrt=["x"], logits="y")
    onnx.checker.check_model(aug, full_check=True)
    classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    seed = np.repeat(np.eye(classes, dtype=x.dtype)[:, None], x.shape[0], axis=1)
    logits, grads = run_augmented(aug, x, seed)
    return aug, grads["x"]


def if_model(direct: bool):
    """y = If(mean(x) > 0, tanh(relu(x) Wa), sigmoid((x*x) Wb)) [+ x Wc]: both branches read
    outer tensors only, as torch.cond exports write them."""
    cn, ci = _cond()
    then = _branch("then", [helper.make_node("MatMul", ["r", "Wa"], ["ta"]),
                            helper.make_node("Tanh", ["ta"], ["tout"])], "tout")
    els = _branch("else", [helper.make_node("Mul", ["x", "x"], ["e0"]),
                           helper.make_node("MatMul", ["e0", "Wb"], ["e1"]),
                           helper.make_node("Sigmoid", ["e1"], ["eout"])], "eout")
    nodes = [helper.make_node("Relu", ["x"], ["r"])] + cn + [
        helper.make_node("If", ["c"], ["f"], name="if1", then_branch=then, else_branch=els)]
    if direct:
        nodes += [helper.make_node("MatMul", ["x", "Wc"], ["d"]), helper.make_node("Add", ["f", "d"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["f"], ["y"])]
    return _model(nodes, ci + [_w("Wa", (4, 3), 1), _w("Wb", (4, 3), 2), _w("Wc", (4, 3), 3)])


def _x(shift, n=2, shape=(4,), scale=0.5, seed=0):
    return shift + scale * np.random.default_rng(seed).standard_normal((n, *shape))


def test_effective_inputs_are_the_outer_reads_of_the_branches():
    node = next(n for n in if_model(direct=True).graph.node if n.op_type == "If")
    ins = effective_inputs(node)
    assert ins[0] == "c" and sorted(ins[1:]) == ["Wa", "Wb", "r", "x"]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("shift", [2.0, -2.0], ids=["then", "else"])
def test_if_reading_outer_tensors_matches_finite_differences(direct, shift):
    model, x = if_model(direct), _x(shift)
    aug, g = pass_gradient(model, x)
    ref = fd_jacobian(model, x)
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()
    assert sum(n.op_type == "If" for n in aug.graph.node) == 2  # forward and backward If


def nested_model():
    """The then-branch holds an If on min(x) > -1 that reads the branch's own tensor and outer
    ones."""
    cn, ci = _cond()
    cn2, ci2 = _cond("ReduceMin", -1.0, "c2")
    then2 = _branch("then2", [helper.make_node("Tanh", ["ta"], ["o1"])], "o1")
    else2 = _branch("else2", [helper.make_node("MatMul", ["x", "Wc"], ["q"]),
                              helper.make_node("Mul", ["ta", "q"], ["o2"])], "o2")
    then = _branch("then", [helper.make_node("MatMul", ["r", "Wa"], ["ta"]),
                            helper.make_node("If", ["c2"], ["tg"], name="inner", then_branch=then2,
                                             else_branch=else2)], "tg")
    els = _branch("else", [helper.make_node("MatMul", ["x", "Wb"], ["e1"]),
                           helper.make_node("Sigmoid", ["e1"], ["eout"])], "eout")
    nodes = [helper.make_node("Relu", ["x"], ["r"])] + cn + cn2 + [
        helper.make_node("If", ["c"], ["f"], name="outer", then_branch=then, else_branch=els),
        helper.make_node("MatMul", ["x", "Wd"], ["d"]), helper.make_node("Add", ["f", "d"], ["y"])]
    inits = ci + ci2 + [_w(n, (4, 3), k) for k, n in enumerate(["Wa", "Wb", "Wc", "Wd"])]
    return _model(nodes, inits)


@pytest.mark.parametrize("case", ["then-then", "then-else", "else"])
def test_nested_if_matches_finite_differences(case):
    x = {"then-then": _x(2.0, scale=0.3), "else": _x(-2.0, scale=0.3)}.get(case)
    if x is None:
        x = _x(2.0, scale=0.3)
        x[1, 2] = -3.0  # min(x) < -1, mean(x) > 0
    model = nested_model()
    _, g = pass_gradient(model, x)
    ref = fd_jacobian(model, x)
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()


def static_if_model(kind: str):
    """An If whose condition is known before the run: Shape(x)[1] == 4, or a Constant false."""
    then = _branch("then", [helper.make_node("MatMul", ["x", "Wa"], ["ta"]),
                            helper.make_node("Tanh", ["ta"], ["tout"])], "tout")
    els = _branch("else", [helper.make_node("MatMul", ["r", "Wb"], ["eout"])], "eout")
    if kind == "shape":
        cn = [helper.make_node("Shape", ["x"], ["s"]),
              helper.make_node("Gather", ["s", "one"], ["s1"], axis=0),
              helper.make_node("Equal", ["s1", "four"], ["c"])]
        ci = [numpy_helper.from_array(np.array(1, np.int64), "one"),
              numpy_helper.from_array(np.array(4, np.int64), "four")]
    else:
        cn, ci = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(False)))], []
    nodes = [helper.make_node("Relu", ["x"], ["r"])] + cn + [
        helper.make_node("If", ["c"], ["f"], name="if1", then_branch=then, else_branch=els),
        helper.make_node("MatMul", ["x", "Wc"], ["d"]), helper.make_node("Add", ["f", "d"], ["y"])]
    return _model(nodes, ci + [_w("Wa", (4, 3), 1), _w("Wb", (4, 3), 2), _w("Wc", (4, 3), 3)])


@pytest.mark.parametrize("kind", ["shape", "constant"])
def test_static_if_is_inlined(kind):
    model, x = static_if_model(kind), _x(0.0)
    aug, g = pass_gradient(model, x)
    assert not any(n.op_type == "If" for n in aug.graph.node)
    ref = fd_jacobian(model, x)
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()


def test_function_operator_inside_a_branch_is_expanded():
    """MeanVarianceNormalization has no rule: ONNX's function body replaces it, in a branch too
    (float32: the body's constants are float)."""
    f = TensorProto.FLOAT
    then = _branch("then", [helper.make_node("MeanVarianceNormalization", ["x"], ["mv"], axes=[1]),
                            helper.make_node("MatMul", ["mv", "Wa"], ["tout"])], "tout", f)
    els = _branch("else", [helper.make_node("MatMul", ["x", "Wb"], ["eout"])], "eout", f)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0), helper.make_node("Greater", ["m", "t"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="if1", then_branch=then, else_branch=els)]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "t"), _w("Wa", (4, 3), 1, np.float32),
             _w("Wb", (4, 3), 2, np.float32)]
    model, x = _model(nodes, inits, elem=f), _x(2.0).astype(np.float32)
    _, g = pass_gradient(model, x)
    ref = fd_jacobian(model, x, h=1e-2)
    assert np.abs(g - ref).max() <= 2e-3 * np.abs(ref).max()


def loop_model(direct: bool):
    """y = Loop(2 times: acc += mean_hw(x) Wa) [+ max_hw(x) Wd] on a [2, 3, 2, 2] image: the body
    reads x from the outer graph."""
    body = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["xm"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["xm", "Wa"], ["p"]), helper.make_node("Add", ["acc_in", "p"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", D, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", D, [2, 3])])
    nodes = [helper.make_node("Loop", ["M", "", "acc0"], ["l"], name="loop1", body=body)]
    nodes += ([helper.make_node("ReduceMax", ["x"], ["xx"], axes=[2, 3], keepdims=0),
               helper.make_node("MatMul", ["xx", "Wd"], ["d"]), helper.make_node("Add", ["l", "d"], ["y"])]
              if direct else [helper.make_node("Identity", ["l"], ["y"])])
    inits = [numpy_helper.from_array(np.array(2, np.int64), "M"),
             numpy_helper.from_array(np.zeros((2, 3)), "acc0"), _w("Wa", (3, 3), 1), _w("Wd", (3, 3), 4)]
    return _model(nodes, inits, batch=2, shape=(3, 2, 2))


def scan_model():
    """y = Scan over 3 constant rows c_t: s += (x Wa) * c_t; the body reads x from outside."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wa"], ["p"]), helper.make_node("Mul", ["p", "c_t"], ["q"]),
         helper.make_node("Add", ["s_in", "q"], ["s_out"])], "body",
        [helper.make_tensor_value_info("s_in", D, [2, 3]), helper.make_tensor_value_info("c_t", D, [3])],
        [helper.make_tensor_value_info("s_out", D, [2, 3])])
    nodes = [helper.make_node("Scan", ["s0", "seq"], ["y"], name="scan1", body=body, num_scan_inputs=1)]
    inits = [numpy_helper.from_array(np.zeros((2, 3)), "s0"), _w("seq", (3, 3), 5), _w("Wa", (4, 3), 1)]
    return _model(nodes, inits, batch=2)


@pytest.mark.parametrize("model, node", [(loop_model(True), "Loop (nodes: loop1)"),
                                         (loop_model(False), "Loop (nodes: loop1)"),
                                         (scan_model(), "Scan (nodes: scan1)")],
                         ids=["loop-direct", "loop-only", "scan-only"])
def test_loop_and_scan_on_the_path_are_refused_by_name(model, node):
    with pytest.raises(UnsupportedOperatorError) as err:
        augment(model, wrt=["x"], logits="y")
    assert node in str(err.value) and "\n" not in str(err.value)


def test_loop_off_the_path_keeps_working():
    """A Loop that reads a float tensor of the path but computes only a shape."""
    body = helper.make_graph(
        [helper.make_node("Shape", ["p"], ["s_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("s_in", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.INT64, [2])])
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["p"]),
             helper.make_node("Loop", ["M", "", "s0"], ["shp"], name="loop1", body=body),
             helper.make_node("Tanh", ["p"], ["t"]), helper.make_node("Reshape", ["t", "shp"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "M"),
             numpy_helper.from_array(np.zeros(2, np.int64), "s0"), _w("Wa", (4, 3), 1)]
    model, x = _model(nodes, inits), _x(0.0, n=3)
    _, g = pass_gradient(model, x)
    ref = fd_jacobian(model, x)
    assert np.abs(g - ref).max() <= 1e-6 * np.abs(ref).max()


def test_torch_cond_export_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    from conftest import torch_jacobian

    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    class Cond(torch.nn.Module):
        def forward(self, x):
            r = torch.relu(x)
            out = torch.cond(x.mean() > 0, lambda r, x: torch.tanh(a(r)),
                             lambda r, x: torch.sigmoid(b(x * x)), (r, x))
            return out + c(x)

    class Plain(torch.nn.Module):  # the same math with a Python if: the oracle
        def forward(self, x):
            out = torch.tanh(a(torch.relu(x))) if x.mean() > 0 else torch.sigmoid(b(x * x))
            return out + c(x)

    prog = torch.onnx.export(Cond().eval(), (torch.randn(2, 4),), dynamo=True, opset_version=18,
                             input_names=["x"], output_names=["logits"], verbose=False)
    model = prog.model_proto
    assert any(n.op_type == "If" and len(effective_inputs(n)) > 1 for n in model.graph.node)
    aug = augment(model, wrt=["x"], logits="logits")
    for shift in (1.5, -1.5):
        x = _x(shift).astype(np.float32)
        seed = np.repeat(np.eye(3, dtype=np.float32)[:, None], 2, axis=1)
        _, grads = run_augmented(aug, x, seed)
        _, ref = torch_jacobian(Plain(), x)
        assert np.abs(grads["x"] - ref).max() <= 1e-5 * np.abs(ref).max()


# -- the CLI ----------------------------------------------------------------------------------

def image_if_model(with_if: bool):
    """A tiny float32 image classifier; with_if puts its conv head in the then-branch of an If
    on mean(x) > -100 (true at run time for any image), beside a direct path. (The MaxPool's
    rule adds an indices output to the branch's forward node; guided backprop changes the
    branch's Relu.)"""
    f = TensorProto.FLOAT
    head = [helper.make_node("Conv", ["r", "Wk"], ["k"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["k"], ["kr"]),
            helper.make_node("MaxPool", ["kr"], ["kp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["kp"], ["gp"]), helper.make_node("Flatten", ["gp"], ["fl"]),
            helper.make_node("MatMul", ["fl", "Wl"], ["tout"])]
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    if with_if:
        els = _branch("else", [helper.make_node("ReduceMean", ["x"], ["em"], axes=[2, 3], keepdims=0),
                               helper.make_node("MatMul", ["em", "W33"], ["eout"])], "eout", f)
        nodes += [helper.make_node("ReduceMean", ["x"], ["mv"], keepdims=0),
                  helper.make_node("Greater", ["mv", "t"], ["c"]),
                  helper.make_node("If", ["c"], ["tout"], name="if1", then_branch=_branch("then", head, "tout", f),
                                   else_branch=els)]
    else:
        nodes += head
    nodes += [helper.make_node("ReduceMax", ["x"], ["mx"], axes=[2, 3], keepdims=0),
              helper.make_node("MatMul", ["mx", "W33"], ["d"]), helper.make_node("Add", ["tout", "d"], ["y"])]
    inits = [_w("Wk", (4, 3, 3, 3), 1, np.float32), _w("Wl", (4, 3), 2, np.float32),
             _w("W33", (3, 3), 3, np.float32), numpy_helper.from_array(np.array(-100.0, np.float32), "t")]
    return _model(nodes, inits, batch=1, elem=f, shape=(3, 8, 8))


def test_cli_explain_if_model_gives_the_maps_of_the_taken_branch(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from skimage import io

    from onnxsal.cli import cli

    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))  # no augmented model from elsewhere
    io.imsave(tmp_path / "a.png", (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8))
    maps = {}
    for with_if in (True, False):
        path = tmp_path / f"m{int(with_if)}.onnx"
        onnx.save(image_if_model(with_if), str(path))
        out = tmp_path / f"out{int(with_if)}"
        res = CliRunner().invoke(cli, ["explain", str(path), str(tmp_path / "a.png"), "-m", "vanilla",
                                       "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        maps[with_if] = np.load(out / "maps.npz")["a/vanilla"]
        pred = json.loads((out / "predictions.json").read_text())
        assert pred["methods"] == ["vanilla"]
    assert np.abs(maps[True]).max() > 0
    np.testing.assert_allclose(maps[True], maps[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["explain", "augment"])
def test_cli_loop_model_exits_2_naming_the_loop(tmp_path, command):
    import os
    import subprocess
    import sys

    from skimage import io

    path = tmp_path / "loop.onnx"
    onnx.save(loop_model(direct=True), str(path))
    io.imsave(tmp_path / "a.png", (np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8))
    args = ([str(tmp_path / "a.png"), "-m", "vanilla", "--out", str(tmp_path / "out"), "--device", "cpu"]
            if command == "explain" else ["-o", str(tmp_path / "g.onnx")])
    env = dict(os.environ, ONNXSAL_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "onnxsal.cli", command, str(path), *args],
                       capture_output=True, text=True, env=env)
    errors = [line for line in p.stderr.strip().splitlines() if not line.startswith("note:")]
    assert p.returncode == 2, p.stderr
    assert len(errors) == 1 and errors[0].startswith("error:") and "Loop (nodes: loop1)" in errors[0], p.stderr


@pytest.mark.parametrize("rules, options", [("guided", {}), ("lrp", {"epsilon": 1.0})])
def test_rule_sets_apply_inside_branches(rules, options):
    """guided backprop's Relu and lrp's Conv/MatMul rules inside the then-branch: the same
    gradient as the model with the branch written out."""
    x = np.random.default_rng(0).random((1, 3, 8, 8)).astype(np.float32)
    seed = np.eye(3, dtype=np.float32)[:, None]
    g_if, g_plain, g_default = (run_augmented(augment(image_if_model(w), rules=r, options=options), x, seed)[1]["x"]
                                for w, r in ((True, rules), (False, rules), (False, "default")))
    assert np.abs(g_plain - g_default).max() > 0.01 * np.abs(g_default).max()  # the rule set matters here
    np.testing.assert_allclose(g_if, g_plain, rtol=1e-5, atol=1e-6)


def test_inspect_lists_the_operators_inside_branches():
    from onnxsal.inspect import summarize

    ops = summarize(image_if_model(True)).operators
    assert ops["If"]["differentiable"] and ops["Conv"]["count"] == 1 and ops["MaxPool"]["count"] == 1
    assert summarize(loop_model(True)).operators["Loop"]["differentiable"] is False


def test_pre_augmented_if_model_runs_in_the_engine(tmp_path, monkeypatch):
    """The forward part cut from an augmented file keeps the producers the branches read."""
    from onnxsal.engine import Engine

    monkeypatch.setenv("ONNXSAL_CACHE", str(tmp_path / "cache"))
    model = image_if_model(True)
    path = tmp_path / "aug.onnx"
    onnx.save(augment(model), str(path))
    x = np.random.default_rng(0).random((1, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(Engine(str(path)).logits(x), ref, rtol=1e-5, atol=1e-6)


def test_sanity_layers_see_a_weight_shared_with_a_branch():
    """W33 is read by a top-level MatMul and inside the else-branch: randomising that layer
    must not change the stored tensor in place (the branch would change too)."""
    from onnxsal.metrics.sanity import find_layers

    layer = next(lay for lay in find_layers(image_if_model(True)) if lay.op_type == "MatMul")
    assert [(o.source, o.private) for o in layer.weights] == [("W33", False)]
