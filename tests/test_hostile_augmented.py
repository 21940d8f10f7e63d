"""Files that carry their own gradient graph are not trusted (onnxsal.trust).

A file augmented by onnxsal's pass is tampered with (its gradient output zeroed, or its seed
rolled to other classes) while its metadata stays: the default engine rebuilds the gradient
from the forward part and matches torch autograd; ``gradients='file'`` refuses it in one
line; the untampered file verifies and is used. Hostile metadata is refused in one line in
file mode and does not matter when the gradient is rebuilt.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.autodiff import augment
from onnxsal.engine import Engine
from onnxsal.errors import ModelError, OptionError, UnsupportedOperatorError
from onnxsal.trust import REBUILT

from conftest import export_torch, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn
SHAPE = (3, 8, 8)
CLASSES = 5


@pytest.fixture(scope="module")
def cnn():
    """(torch module, onnxsal-augmented file of its export)."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(6 * 4 * 4, CLASSES)).eval()
    return m, augment(export_torch(m, torch.randn(2, *SHAPE)))


def _copy(model):
    return onnx.ModelProto.FromString(model.SerializeToString())


def _roles(model):
    return {p.key: p.value for p in model.metadata_props}


def zeroed(model):
    """The gradient output multiplied by 0 (the metadata unchanged)."""
    m = _copy(model)
    out = _roles(m)["onnxsal.grad.x"]
    node = next(n for n in m.graph.node if out in n.output)
    node.output[list(node.output).index(out)] = out + "_before"
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "tamper_zero"))
    m.graph.node.append(helper.make_node("Mul", [out + "_before", "tamper_zero"], [out]))
    return m


def rolled(model):
    """The seed's classes rolled by one: row k gives the gradient of class k - 1."""
    m = _copy(model)
    seed = _roles(m)["onnxsal.seed"]
    for n in m.graph.node:
        n.input[:] = [seed + "_rolled" if i == seed else i for i in n.input]
    perm = np.roll(np.arange(CLASSES), -1).astype(np.int64)
    m.graph.initializer.append(numpy_helper.from_array(perm, "tamper_perm"))
    m.graph.node.insert(0, helper.make_node("Gather", [seed, "tamper_perm"], [seed + "_rolled"], axis=2))
    return m


def _x():
    return np.random.default_rng(1).random((3, *SHAPE), dtype=np.float32)


def _assert_true(module, eng):
    x = _x()
    _, ref = torch_jacobian(module, x)
    for cls, g in eng.class_gradients(x):
        np.testing.assert_allclose(g, ref[cls], atol=1e-5 * np.abs(ref).max())


def _one_line_error(kind, match, model, **kw):
    with pytest.raises(kind, match=match) as info:
        Engine(model, device="cpu", use_disk_cache=False, threads=1, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("tamper", [zeroed, rolled])
def test_default_rebuilds_a_tampered_gradient(cnn, tamper):
    module, aug = cnn
    bad = tamper(aug)
    # the tampering is real: the file's own gradient output is wrong
    import onnxruntime as ort

    sess = ort.InferenceSession(bad.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _x()
    seed = np.repeat(np.eye(CLASSES, dtype=np.float32)[:, None], len(x), axis=1)
    own = sess.run([_roles(bad)["onnxsal.grad.x"]], {"x": x, _roles(bad)["onnxsal.seed"]: seed})[0]
    _, ref = torch_jacobian(module, x)
    assert np.abs(own - ref).max() > 0.1 * np.abs(ref).max()
    for mode in ("auto", "rebuild"):
        eng = Engine(bad, device="cpu", use_disk_cache=False, threads=1, gradients=mode)
        assert eng.gradient_source == REBUILT
        _assert_true(module, eng)


@pytest.mark.parametrize("tamper", [zeroed, rolled])
def test_file_mode_refuses_a_tampered_gradient(cnn, tamper):
    msg = _one_line_error(ModelError, "disagrees with onnxsal's pass", tamper(cnn[1]), gradients="file")
    assert "max rel err" in msg


def test_file_mode_uses_a_verified_gradient(cnn):
    module, aug = cnn
    eng = Engine(aug, device="cpu", use_disk_cache=False, threads=1, gradients="file")
    assert eng.gradient_source.startswith("file's own, verified against onnxsal's pass (max rel err")
    _assert_true(module, eng)
    assert eng.augmented()[1]["onnxsal.seed"] == _roles(aug)["onnxsal.seed"]
    with pytest.raises(OptionError, match="own gradient graph"):
        eng.gradient(_x(), rules="guided")


def _no_rule(monkeypatch):
    """onnxsal's pass cannot differentiate the model (as for an operator without a rule)."""
    def refuse(*a, **k):
        raise UnsupportedOperatorError({"LpPool": ["pool"]})

    monkeypatch.setattr("onnxsal.engine.augment", refuse)


def test_auto_checks_the_file_by_finite_differences_when_the_pass_cannot(cnn, monkeypatch):
    module, aug = cnn
    _no_rule(monkeypatch)
    eng = Engine(aug, device="cpu", use_disk_cache=False, threads=1)
    assert eng.gradient_source.startswith(
        "file's own, verified against central finite differences of the forward part")
    _assert_true(module, eng)
    for tamper in (zeroed, rolled):
        _one_line_error(ModelError, "disagrees with central finite differences", tamper(aug))
    with pytest.raises(UnsupportedOperatorError):
        Engine(aug, device="cpu", use_disk_cache=False, threads=1, gradients="rebuild").gradient(_x())


def test_a_slightly_scaled_gradient_fails_finite_differences(cnn, monkeypatch):
    m = _copy(cnn[1])
    out = _roles(m)["onnxsal.grad.x"]
    node = next(n for n in m.graph.node if out in n.output)
    node.output[0] = out + "_before"
    m.graph.initializer.append(numpy_helper.from_array(np.float32(1.05), "tamper_scale"))
    m.graph.node.append(helper.make_node("Mul", [out + "_before", "tamper_scale"], [out]))
    _no_rule(monkeypatch)
    _one_line_error(ModelError, "along the gradient", m)


def _with_meta(model, **changes):
    m = _copy(model)
    keep = [p for p in m.metadata_props if p.key not in changes]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, values in changes.items():
        for v in ([] if values is None else values if isinstance(values, list) else [values]):
            m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return m


def wrong_shape(model):
    """The gradient output summed over its seed rows: [N, C, H, W] instead of [K, N, C, H, W]."""
    m = _copy(model)
    out = _roles(m)["onnxsal.grad.x"]
    node = next(n for n in m.graph.node if out in n.output)
    node.output[0] = out + "_before"
    m.graph.initializer.append(numpy_helper.from_array(np.int64([0]), "tamper_axes"))
    m.graph.node.append(helper.make_node("ReduceSum", [out + "_before", "tamper_axes"], [out], keepdims=0))
    vi = next(o for o in m.graph.output if o.name == out)
    vi.CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    return m


def extra_seed(model):
    """A second seed input that the gradient output also depends on."""
    m = _copy(model)
    m.graph.input.append(helper.make_tensor_value_info("seed2", TensorProto.FLOAT, [1]))
    out = _roles(m)["onnxsal.grad.x"]
    node = next(n for n in m.graph.node if out in n.output)
    node.output[0] = out + "_before"
    m.graph.node.append(helper.make_node("Mul", [out + "_before", "seed2"], [out]))
    return m


HOSTILE = {
    "seed without logits": (lambda m: _with_meta(m, **{"onnxsal.logits": None}), "no logits"),
    "two seeds named": (lambda m: _with_meta(m, **{"onnxsal.seed": ["onnxsal_seed", "x"]}),
                        "more than once"),
    "seed is no input": (lambda m: _with_meta(m, **{"onnxsal.seed": "nowhere"}), "not an input"),
    "gradient is no output": (lambda m: _with_meta(m, **{"onnxsal.grad.x": "nowhere"}),
                              "not an output"),
    "no gradient of the image": (lambda m: _with_meta(m, **{"onnxsal.grad.x": None}), "is missing"),
    "gradient of other logits": (lambda m: _with_meta(m, **{"onnxsal.logits": "x"}), "is not the logits"),
    "gradient of the wrong shape": (wrong_shape, r"has shape \[2, 3, 8, 8\] for 5 seed rows of 2 images"),
    "second seed input": (extra_seed, "inputs besides"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata(cnn, case):
    """File mode: one line naming the problem. Default: the metadata does not matter, the
    gradient is rebuilt from the forward part and is right."""
    module, aug = cnn
    make, match = HOSTILE[case]
    bad = make(aug)
    _one_line_error(ModelError, match, bad, gradients="file")
    eng = Engine(bad, device="cpu", use_disk_cache=False, threads=1)
    assert eng.gradient_source == REBUILT
    _assert_true(module, eng)


def test_plain_model_file_mode_and_modes(cnn):
    module, aug = cnn
    plain = export_torch(module, torch.randn(2, *SHAPE))
    assert Engine(plain, device="cpu", use_disk_cache=False).gradient_source == "onnxsal pass"
    _one_line_error(OptionError, "carries no gradient graph", plain, gradients="file")
    _one_line_error(OptionError, "not one of", aug, gradients="trusted")


def test_rebuilt_file_takes_preprocessing(cnn):
    """The rebuilt gradient goes through a preprocessing prefix; the file's own cannot."""
    module, aug = cnn
    eng = Engine(aug, device="cpu", use_disk_cache=False, threads=1, preprocess="scale=2")
    x = _x()
    _, ref = torch_jacobian(module, 2 * x)
    _, g = eng.gradient(x, targets=[0, 1, 2])
    want = 2 * ref[[0, 1, 2], [0, 1, 2]]
    np.testing.assert_allclose(g, want, atol=1e-5 * np.abs(want).max())
    _one_line_error(OptionError, "preprocessing", aug, gradients="file", preprocess="scale=2")


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A softmax CNN's file, its `onnxsal augment` output (logits exposed beside the
    probabilities) and that output with its gradient zeroed."""
    from click.testing import CliRunner

    from onnxsal.cli import cli

    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, CLASSES), nn.Softmax(dim=1)).eval()
    d = tmp_path_factory.mktemp("cli")
    onnx.save(export_torch(m, torch.randn(2, *SHAPE)), str(d / "plain.onnx"))
    res = CliRunner().invoke(cli, ["augment", str(d / "plain.onnx"), "-o", str(d / "aug.onnx")])
    assert res.exit_code == 0, res.output
    onnx.save(zeroed(onnx.load(str(d / "aug.onnx"))), str(d / "bad.onnx"))
    rng = np.random.default_rng(0)
    np.savez(d / "x.npz", x=rng.random((2, *SHAPE), dtype=np.float32), y=np.array([0, 1]))
    return d


def test_inspect_says_which_gradients(cli_files):
    import json

    from click.testing import CliRunner

    from onnxsal.cli import cli

    run = CliRunner().invoke
    plain = json.loads(run(cli, ["inspect", str(cli_files / "plain.onnx"), "--json"]).output)
    own = json.loads(run(cli, ["inspect", str(cli_files / "bad.onnx"), "--json"]).output)
    assert plain["gradients"] == "onnxsal pass"
    assert own["gradients"].startswith("onnxsal pass: the file carries its own gradient graph, which is not used")
    # the summary is of the forward part: the same operators and logits as the plain file
    assert own["operators"] == plain["operators"] and own["logits"] == plain["logits"]
    text = run(cli, ["inspect", str(cli_files / "bad.onnx")]).output
    assert "gradients   onnxsal pass: the file carries its own gradient graph" in text


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "onnxsal.cli", *map(str, args)],
                          capture_output=True, text=True)


def test_explain_records_and_refuses(cli_files, tmp_path):
    import json

    p = _cli("explain", cli_files / "bad.onnx", cli_files / "x.npz", "-m", "vanilla",
             "--out", tmp_path / "ok", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    pred = json.loads((tmp_path / "ok" / "predictions.json").read_text())
    assert pred["gradients"] == REBUILT
    maps = np.load(tmp_path / "ok" / "maps.npz")
    assert len(maps.files) == 2 and all(np.abs(maps[k]).max() > 0 for k in maps.files)
    p = _cli("explain", cli_files / "bad.onnx", cli_files / "x.npz", "-m", "vanilla",
             "--out", tmp_path / "no", "--device", "cpu", "--gradients", "file")
    assert p.returncode == 2
    errors = [line for line in p.stderr.strip().splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error: the file's own gradient disagrees"), p.stderr
    p = _cli("explain", cli_files / "aug.onnx", cli_files / "x.npz", "-m", "vanilla",
             "--out", tmp_path / "file", "--device", "cpu", "--gradients", "file")
    assert p.returncode == 0, p.stderr
    pred = json.loads((tmp_path / "file" / "predictions.json").read_text())
    assert pred["gradients"].startswith("file's own, verified against onnxsal's pass")


def test_benchmark_records_which_gradients(cli_files, tmp_path):
    import json

    p = _cli("benchmark", cli_files / "bad.onnx", cli_files / "plain.onnx", "--data",
             cli_files / "x.npz", "-m", "original", "--out", tmp_path, "--device", "cpu", "--quiet")
    assert p.returncode == 0, p.stderr
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    assert [m["gradients"] for m in models] == [REBUILT, "onnxsal pass"]


def _if_file():
    """(weights, file): x -> Conv -> Relu -> Flatten -> If(true: @A, else: @B) -> logits, with a
    gradient graph from onnxsal's pass on the If-free model. The branches read the outer
    tensors h, A and B: the forward part must keep what subgraphs capture."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    a = rng.standard_normal((75, 4)).astype(np.float32)
    b = rng.standard_normal((75, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(v, n) for v, n in ((w, "W"), (a, "A"), (b, "B"))]
    inits.append(numpy_helper.from_array(np.float32(-1), "minus_one"))
    # a condition computed from the image (always true for pixels in [0, 1]): not folded away
    body = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "minus_one"], ["cond"]),
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["h"])]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    plain = helper.make_model(helper.make_graph(body + [helper.make_node("MatMul", ["h", "A"], ["logits"])],
                                                "g", *io, inits), opset_imports=[helper.make_opsetid("", 17)])
    plain.ir_version = 8
    aug = augment(plain)

    def branch(name, weight):
        out = helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node("MatMul", ["h", weight], [name + "_y"])], name, [], [out])

    node = next(n for n in aug.graph.node if n.op_type == "MatMul" and list(n.output) == ["logits"])
    node.CopyFrom(helper.make_node("If", ["cond"], ["logits"], then_branch=branch("then", "A"),
                                   else_branch=branch("else", "B")))
    onnx.checker.check_model(aug)
    return (w, a), aug


def _if_oracle(w, a, x):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = torch.relu(torch.nn.functional.conv2d(xt, torch.from_numpy(w), padding=1)).flatten(1) @ torch.from_numpy(a)
    return np.stack([torch.autograd.grad(y[:, k].sum(), xt, retain_graph=True)[0].numpy() for k in range(4)])


def test_forward_part_keeps_what_subgraphs_read():
    """If has no gradient rule here (or has one): either way the engine's gradients are
    right, the forward part runs, and a zeroed file gradient is never used."""
    from onnxsal.trust import forward_part

    (w, a), aug = _if_file()
    fwd = forward_part(aug, "x")
    assert [i.name for i in fwd.graph.input] == ["x"] and [o.name for o in fwd.graph.output] == ["logits"]
    assert {n.op_type for n in fwd.graph.node} == {"ReduceSum", "Greater", "Conv", "Relu", "Flatten", "If"}
    x = np.random.default_rng(0).random((2, 3, 5, 5), dtype=np.float32)
    ref = _if_oracle(w, a, x)
    eng = Engine(aug, device="cpu", use_disk_cache=False, threads=1)
    assert eng.gradient_source == REBUILT or eng.gradient_source.startswith(
        "file's own, verified against central finite differences")
    got = np.concatenate([g for _, g in eng.class_gradients(x)])
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    try:
        bad = Engine(zeroed(aug), device="cpu", use_disk_cache=False, threads=1)
    except ModelError as exc:
        assert "disagrees with central finite differences" in str(exc)
    else:
        assert bad.gradient_source == REBUILT
        np.testing.assert_allclose(np.concatenate([g for _, g in bad.class_gradients(x)]), ref,
                                   atol=1e-5 * np.abs(ref).max())


def test_forward_part_keeps_a_second_model_output():
    """A model with two outputs (logits and features), augmented for its logits: the forward
    part keeps both (the logits output is the model's, not one the pass exposed)."""
    from onnxsal.trust import forward_part

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((48, 4)).astype(np.float32), "A"),
             numpy_helper.from_array(rng.standard_normal((48, 2)).astype(np.float32), "F")]
    nodes = [helper.make_node("Flatten", ["x"], ["h"]), helper.make_node("MatMul", ["h", "A"], ["logits"]),
             helper.make_node("MatMul", ["h", "F"], ["features"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    fwd = forward_part(augment(m, logits="logits"), "x")
    assert [o.name for o in fwd.graph.output] == ["logits", "features"]


def test_augment_replaces_a_files_own_gradient_graph(cli_files, tmp_path):
    """`onnxsal augment` of a file with a (tampered) gradient graph: the result has one seed
    input and onnxsal's gradient, not the old graph stacked under the new one."""
    from click.testing import CliRunner

    from onnxsal.cli import cli

    from conftest import identity_seed, run_augmented

    out = tmp_path / "again.onnx"
    res = CliRunner().invoke(cli, ["augment", str(cli_files / "bad.onnx"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    again, ref = onnx.load(str(out)), onnx.load(str(cli_files / "aug.onnx"))
    assert [i.name for i in again.graph.input] == [i.name for i in ref.graph.input]
    x = np.load(cli_files / "x.npz")["x"]
    _, g = run_augmented(again, x, identity_seed(CLASSES, len(x)))
    _, want = run_augmented(ref, x, identity_seed(CLASSES, len(x)))
    assert np.abs(want["x"]).max() > 0
    np.testing.assert_allclose(g["x"], want["x"], atol=1e-6 * np.abs(want["x"]).max())
