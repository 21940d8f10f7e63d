"""Every tensor a model can hold is checked for external data: sparse initializers, sparse
``Constant`` values, tensors in subgraphs, in model-local functions and in training graphs.

A model file's external-data locations are resolved against the model's folder only; a
location elsewhere (or any external reference in a model given without its folder) is a
one-line refusal before any onnxruntime session exists. The CLI cases run in a subprocess
whose current folder holds a secret: onnxruntime, given the model as bytes, would resolve a
relative location against that folder and put the secret's bytes into the logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.errors import ModelError

SECRET = b"AKIAEXAMPLESECRETKEY0123456789abcdefghijklmnopqrstuvwxyz+SECRET!"  # 64 bytes
ROOT = Path(__file__).resolve().parents[1]


def _external(t: onnx.TensorProto, location: str, length: int) -> onnx.TensorProto:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _sparse(location: str | None, name: str = "S") -> onnx.SparseTensorProto:
    """A [48, 2] float sparse tensor with 16 stored values (their data external when
    ``location`` is given: 16 floats are the 64 bytes of SECRET)."""
    values = numpy_helper.from_array(np.linspace(0.1, 1.6, 16).astype(np.float32), name)
    if location is not None:
        _external(values, location, 64)
    indices = numpy_helper.from_array(np.arange(0, 96, 6, dtype=np.int64), name + "_indices")
    return helper.make_sparse_tensor(values, indices, [48, 2])


def _head(matrix_node: onnx.NodeProto | None, extra_nodes=(), functions=(), opsets=()) -> onnx.ModelProto:
    """x [N, 3, 4, 4] -> Flatten -> MatMul with S -> logits [N, 2]."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), *extra_nodes,
             helper.make_node("MatMul", ["f", "S"], ["logits"])]
    if matrix_node is not None:
        nodes.insert(1, matrix_node)
    g = helper.make_graph(nodes, "sparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), *opsets], functions=list(functions))
    m.ir_version = 8
    return m


def sparse_initializer(location: str | None) -> onnx.ModelProto:
    m = _head(None)
    m.graph.sparse_initializer.append(_sparse(location))
    return m


def sparse_constant(location: str | None) -> onnx.ModelProto:
    return _head(helper.make_node("Constant", [], ["S"], sparse_value=_sparse(location, "c")))


def constant_in_subgraph(location: str | None) -> onnx.ModelProto:
    """S is an If's [8, 2] output (Constants in its branches, the then-branch's one external)
    padded to [48, 2]."""
    ext = numpy_helper.from_array(np.zeros((16,), np.float32), "e")
    if location is not None:
        _external(ext, location, 64)
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)

    def branch(name, tensor, shape_node):
        return helper.make_graph(shape_node + [helper.make_node("Constant", [], ["b0"], value=tensor),
                                               helper.make_node("Reshape", ["b0", "shp"], ["b"])],
                                 name, [], [out])

    shp16 = [helper.make_node("Constant", [], ["shp"], value=numpy_helper.from_array(np.array([8, 2], np.int64)))]
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True)))
    pad = helper.make_node("Constant", [], ["pads"], value=numpy_helper.from_array(np.array([0, 0, 40, 0], np.int64)))
    node = helper.make_node("If", ["cond"], ["s8"], then_branch=branch("then", ext, shp16),
                            else_branch=branch("else", numpy_helper.from_array(np.zeros(16, np.float32), "z"), shp16))
    return _head(cond, [pad, node, helper.make_node("Pad", ["s8", "pads"], ["S"])])


def constant_in_function(location: str | None) -> onnx.ModelProto:
    """S is the output of a model-local function whose body is a Constant."""
    body = numpy_helper.from_array(np.zeros((48, 2), np.float32), "fw")
    if location is not None:
        _external(body, location, 64)
        body.dims[:] = [16]
    f = helper.make_function("local", "Weights", [], ["w"], [helper.make_node("Constant", [], ["w"], value=body)],
                             [helper.make_opsetid("", 17)])
    return _head(helper.make_node("Weights", [], ["S"], domain="local"), functions=[f],
                 opsets=[helper.make_opsetid("local", 1)])


BUILDERS = {"sparse_initializer": sparse_initializer, "sparse_constant": sparse_constant,
            "constant_in_subgraph": constant_in_subgraph, "constant_in_function": constant_in_function}


@pytest.fixture
def cwd_with_secret(tmp_path):
    """(current folder holding .aws/credentials and secret.bin, the model folder inside it)."""
    cwd = tmp_path / "home"
    (cwd / ".aws").mkdir(parents=True)
    (cwd / ".aws" / "credentials").write_bytes(SECRET)
    (cwd / "secret.bin").write_bytes(SECRET)
    models = cwd / "models"
    models.mkdir()
    return cwd, models


def _cli(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ONNXSAL_CACHE=str(Path(cwd) / "cache"))
    return subprocess.run([sys.executable, "-m", "onnxsal.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _image(path: Path) -> Path:
    from skimage import io as skio

    skio.imsave(path, (np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8), check_contrast=False)
    return path


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("location", [".aws/credentials", "secret.bin", "../secret.bin", "ABSOLUTE"])
def test_external_reference_outside_the_folder_is_refused(kind, location, cwd_with_secret):
    from onnxsal.model import load_model

    cwd, models = cwd_with_secret
    loc = str(cwd / "secret.bin") if location == "ABSOLUTE" else location
    p = models / f"{kind}.onnx"
    p.write_bytes(BUILDERS[kind](loc).SerializeToString())
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with pytest.raises(ModelError, match="outside the model's folder: refused|which is missing"):
            load_model(p)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("command", ["inspect", "explain"])
def test_cli_from_a_folder_holding_a_secret(command, cwd_with_secret):
    """The real attack: a relative location that exists only in the current folder."""
    cwd, models = cwd_with_secret
    p = models / "m.onnx"
    p.write_bytes(sparse_initializer(".aws/credentials").SerializeToString())
    args = [command, p] + ([_image(cwd / "a.png"), "--out", cwd / "out", "--method", "gradient"]
                           if command == "explain" else [])
    r = _cli(args, cwd)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sparse tensor 'S'" in lines[0], r.stderr
    assert "missing" in lines[0]
    assert not (cwd / "out").exists()


def test_symlink_inside_the_folder_to_a_secret_is_refused(cwd_with_secret):
    from onnxsal.model import load_model

    cwd, models = cwd_with_secret
    os.symlink(cwd / ".aws" / "credentials", models / "weights.bin")
    p = models / "m.onnx"
    p.write_bytes(sparse_constant("weights.bin").SerializeToString())
    with pytest.raises(ModelError, match="a link leading outside the model's folder: refused"):
        load_model(p)


def test_training_info_tensors_are_checked(cwd_with_secret):
    from onnxsal.model import load_model
    from onnxsal.tensors import iter_tensors

    _, models = cwd_with_secret
    m = sparse_initializer(None)
    t = _external(numpy_helper.from_array(np.zeros(16, np.float32), "step"), "../secret.bin", 64)
    init = helper.make_graph([], "init", [], [], initializer=[t])
    m.training_info.append(onnx.TrainingInfoProto(initialization=init))
    assert "tensor 'step'" in [label for _, label in iter_tensors(m)]
    p = models / "m.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError, match="tensor 'step' keeps its data at '../secret.bin', outside"):
        load_model(p)


def _dense_oracle(values: np.ndarray) -> np.ndarray:
    """The MatMul weight the sparse tensor stands for, as a dense array."""
    w = np.zeros(96, np.float32)
    w[np.arange(0, 96, 6)] = values
    return w.reshape(48, 2)


@pytest.mark.parametrize("kind", ["sparse_initializer", "sparse_constant"])
def test_external_sparse_data_inside_the_folder_is_read_and_inlined(kind, cwd_with_secret):
    """Data kept beside the model are read from the model's folder (not the current one) and
    inlined, so the engine's sessions see no external reference; the logits agree with a
    dense model run by onnxruntime."""
    import onnxruntime as ort

    from onnxsal.engine import Engine
    from onnxsal.model import load_model
    from onnxsal.tensors import iter_tensors

    cwd, models = cwd_with_secret
    values = np.arange(1, 17, dtype=np.float32) / 8
    (models / "sparse.bin").write_bytes(values.tobytes())
    (cwd / "sparse.bin").write_bytes(SECRET)  # the wrong one, in the current folder
    p = models / "m.onnx"
    p.write_bytes(BUILDERS[kind]("sparse.bin").SerializeToString())
    old = os.getcwd()
    os.chdir(cwd)
    try:
        m = load_model(p)
        assert all(t.data_location != TensorProto.EXTERNAL for t, _ in iter_tensors(m))
        x = np.random.default_rng(1).random((2, 3, 4, 4)).astype(np.float32)
        got = Engine(p, device="cpu", use_disk_cache=False).logits(x)
    finally:
        os.chdir(old)
    dense = _head(None)
    dense.graph.initializer.append(numpy_helper.from_array(_dense_oracle(values), "S"))
    want = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_model_given_without_its_folder_may_not_use_external_data(kind, cwd_with_secret):
    from onnxsal.engine import Engine

    cwd, _ = cwd_with_secret
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with pytest.raises(ModelError, match="given without its folder"):
            Engine(BUILDERS[kind]("secret.bin"), device="cpu", use_disk_cache=False)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_the_same_models_with_inline_data_run(kind):
    """The four shapes of model are valid and explainable when their data are inline, so the
    refusals above are about the external reference and nothing else."""
    from onnxsal.engine import Engine
    from onnxsal.model import validate

    m = BUILDERS[kind](None)
    validate(m)
    e = Engine(m, device="cpu", use_disk_cache=False)
    _, g = e.gradient(np.random.default_rng(0).random((1, 3, 4, 4)).astype(np.float32))
    assert g.shape == (1, 3, 4, 4) and np.isfinite(g).all()
