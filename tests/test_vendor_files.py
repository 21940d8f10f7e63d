"""Files as other exporters write them (paddle2onnx-like, built here with onnx.helper): opset
11 with dynamic H and W, a ``-1`` batch dim, broadcast constants, a gate whose [N, C, 1, 1]
shape only the run knows, weights in Constant nodes; gradients against torch autograd in
float64 with the same weights, two image sizes from one augmented file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from onnxsal.autodiff import augment
from onnxsal.cli import cli
from onnxsal.errors import InputError, OptionError
from onnxsal.model import dim_of, find_image_input, parameter_count, with_image_size
from onnxsal.preprocess import read_labels

torch = pytest.importorskip("torch")
F = torch.nn.functional
C, CLASSES = 4, 5


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W1": rng.normal(0, .5, (C, 3, 3, 3)), "b1": rng.normal(0, .5, (1, C, 1, 1)),
            "s1": rng.normal(1, .3, (1, C, 1, 1)), "W2": rng.normal(0, .5, (C, C, 3, 3)),
            "Wf": rng.normal(0, .5, (C, CLASSES)), "bf": rng.normal(0, .5, (CLASSES,))}


def vendor_model(opset: int = 11, batch=-1, constants: bool = False) -> onnx.ModelProto:
    """conv + bias [1,C,1,1] + scale, a residual Add (both sizes unknown to shape inference),
    a sigmoid gate reshaped by a shape that goes through float (so only the run knows its
    1s), global pooling, MatMul + bias, Softmax. ``constants``: weights in Constant nodes."""
    w = {k: v.astype(np.float32) for k, v in weights().items()}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "b1"], ["a1"]),
        helper.make_node("Mul", ["a1", "s1"], ["m1"]),
        helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"]),
        helper.make_node("GlobalAveragePool", ["res"], ["gp"]),
        helper.make_node("Shape", ["gp"], ["gs"]),
        helper.make_node("Cast", ["gs"], ["gsf"], to=TP.FLOAT),
        helper.make_node("Cast", ["gsf"], ["gsi"], to=TP.INT64),
        helper.make_node("Reshape", ["gp", "gsi"], ["gate0"]),
        helper.make_node("Sigmoid", ["gate0"], ["gate"]),
        helper.make_node("Mul", ["res", "gate"], ["se"]),
        helper.make_node("GlobalAveragePool", ["se"], ["gp2"]),
        helper.make_node("Flatten", ["gp2"], ["fl"]),
        helper.make_node("MatMul", ["fl", "Wf"], ["mm"]),
        helper.make_node("Add", ["mm", "bf"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if constants:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inits] + nodes
        inits = []
    g = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TP.FLOAT, [batch, 3, None, None])],
                          [helper.make_tensor_value_info("prob", TP.FLOAT, [batch, CLASSES])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="PaddlePaddle")
    m.ir_version = 6
    return m


def torch_reference(x: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray]:
    """(logits, d logit[target] / dx) of the same network in float64 torch."""
    w = {k: torch.tensor(v) for k, v in weights().items()}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    r1 = torch.relu((F.conv2d(xt, w["W1"], padding=1) + w["b1"]) * w["s1"])
    res = F.conv2d(r1, w["W2"], padding=1) + r1
    se = res * torch.sigmoid(res.mean((2, 3), keepdim=True))
    logits = se.mean((2, 3)) @ w["Wf"] + w["bf"]
    logits[torch.arange(len(x)), torch.as_tensor(targets)].sum().backward()
    return logits.detach().numpy(), xt.grad.numpy()


def run(aug: onnx.ModelProto, x: np.ndarray, targets) -> tuple[np.ndarray, np.ndarray]:
    meta = {p.key: p.value for p in aug.metadata_props}
    seed = np.zeros((1, len(x), CLASSES), np.float32)
    seed[0, np.arange(len(x)), targets] = 1
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, grad = sess.run([meta["onnxsal.logits"], meta["onnxsal.grad.x"]],
                            {meta["onnxsal.input"]: x, meta["onnxsal.seed"]: seed})
    return logits, grad[0]


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("batch", [-1, "N"])
@pytest.mark.parametrize("opset", [11, 13])
def test_dynamic_hw_gradients_two_sizes(opset, batch):
    """One augmented file, two image sizes: the broadcast sums whose axes only the run knows
    are taken at the model's own opset (no upgrade), and match torch."""
    aug = augment(vendor_model(opset, batch))
    assert aug.opset_import[0].version == opset
    assert [dim_of(d) for d in aug.graph.input[0].type.tensor_type.shape.dim][2:] == [None, None]
    for hw in ((9, 13), (16, 7)):
        x = np.random.default_rng(hw[0]).random((2, 3) + hw, dtype=np.float32)
        logits, grad = run(aug, x, [1, 3])
        ref_logits, ref = torch_reference(x, [1, 3])
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
        assert grad.shape == x.shape
        assert rel_err(grad, ref) < 2e-6


def test_seed_and_logits_declared_n_c():
    """Shape inference cannot see through the gate: the seed is still declared [K, N, C] and
    the logits output [N, C] with the class count."""
    aug = augment(vendor_model())
    seed = next(i for i in aug.graph.input if i.name.startswith("onnxsal_seed"))
    assert [dim_of(d) for d in seed.type.tensor_type.shape.dim] == ["K", "N", CLASSES]
    logits = next(o for o in aug.graph.output if o.name == "logits")
    assert [dim_of(d) for d in logits.type.tensor_type.shape.dim] == ["N", CLASSES]


def test_minus_one_batch_is_dynamic():
    """paddle2onnx marks a dynamic batch with dim_value -1: read as dynamic everywhere."""
    m = vendor_model()
    assert find_image_input(m).shape == [None, 3, None, None]
    d = onnx.TensorShapeProto.Dimension()
    for value, expected in ((-1, None), (0, None), (7, 7)):
        d.dim_value = value
        assert dim_of(d) == expected


def test_cli_augment_no_simplify_and_size(tmp_path):
    """`augment --no-simplify` on a -1 batch file (the rank probe used to feed -1), and
    `--size HxW`, which fixes H and W: the file then has static sizes and the gradient at
    that size still matches torch."""
    src = tmp_path / "paddle.onnx"
    onnx.save(vendor_model(), str(src))
    x = np.random.default_rng(3).random((3, 3, 10, 12), dtype=np.float32)
    ref_logits, ref = torch_reference(x, [0, 2, 4])
    for args in (["--no-simplify"], ["--size", "10x12"]):
        out = tmp_path / f"aug{len(args)}.onnx"
        res = CliRunner().invoke(cli, ["augment", str(src), "-o", str(out)] + args)
        assert res.exit_code == 0, res.output
        aug = onnx.load(str(out))
        logits, grad = run(aug, x, [0, 2, 4])
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
        assert rel_err(grad, ref) < 2e-6
    dims = [dim_of(d) for d in aug.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [None, 3, 10, 12]
    res = CliRunner().invoke(cli, ["augment", str(src), "-o", str(out), "--size", "0x3"])
    assert isinstance(res.exception, OptionError)


def test_size_must_fit_a_fixed_input():
    m = with_image_size(vendor_model(), (8, 8))
    with pytest.raises(OptionError, match="does not fit"):
        with_image_size(m, (9, 8))
    # channels last: H and W are axes 1 and 2
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
                           helper.make_node("GlobalAveragePool", ["t"], ["y"])], "nhwc",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [-1, None, None, 3])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    fixed = with_image_size(helper.make_model(g), (6, 9))
    assert find_image_input(fixed).shape == [None, 6, 9, 3]


def test_parameters_in_constant_nodes(tmp_path):
    """inspect counts weights kept in Constant nodes (it said 0)."""
    expected = sum(v.size for v in weights().values())
    assert parameter_count(vendor_model(constants=True)) == expected == parameter_count(vendor_model())
    path = tmp_path / "const.onnx"
    onnx.save(vendor_model(constants=True), str(path))
    res = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parameters"] == expected


def test_explain_dynamic_hw_uses_the_images_size(tmp_path):
    """explain on a dynamic-size model takes images that share a size at that size (and says
    so); images of two sizes get one error naming them."""
    from skimage import io

    src = tmp_path / "paddle.onnx"
    onnx.save(vendor_model(), str(src))
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (14, 18, 3)), ("b.png", (14, 18, 3)), ("c.png", (15, 18, 3))):
        io.imsave(tmp_path / name, (rng.random(shape) * 255).astype(np.uint8), check_contrast=False)
    out = tmp_path / "ex"
    res = CliRunner().invoke(cli, ["explain", str(src), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                                   "-m", "vanilla,gradcam", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "own size 14x18" in res.output
    assert any("own size 14x18" in n for n in json.loads((out / "predictions.json").read_text())["notes"])
    maps = np.load(out / "maps.npz")
    assert maps["a/vanilla"].shape == (14, 18) and maps["b/gradcam"].shape == (14, 18)
    res = CliRunner().invoke(cli, ["explain", str(src), str(tmp_path / "a.png"), str(tmp_path / "c.png"),
                                   "--out", str(tmp_path / "ex2")])
    assert isinstance(res.exception, InputError) and "14x18, 15x18" in str(res.exception)


def test_keras_class_indices_labels(tmp_path):
    """Keras's class_indices.json ({name: index}) and imagenet_class_index.json are labels
    files; a gap in the indices (which would shift every later name) is not."""
    p = tmp_path / "class_indices.json"
    p.write_text(json.dumps({"dog": 1, "cat": 0, "fox": 2}))
    assert read_labels(p) == ["cat", "dog", "fox"]
    p.write_text(json.dumps({"2": "fox", "0": "cat", "1": "dog"}))
    assert read_labels(p) == ["cat", "dog", "fox"]
    p.write_text(json.dumps({"1": ["n02084071", "dog"], "0": ["n02121808", "cat"]}))  # imagenet_class_index
    assert read_labels(p) == ["cat", "dog"]
    p.write_text(json.dumps({"dog": 1, "cat": 3}))
    with pytest.raises(InputError, match="class_indices"):
        read_labels(p)


def _broadcast_graph(opset: int) -> onnx.ModelProto:
    """logits = [flat((a + b) * c), flat(p @ w)]: inputs of known rank and unknown sizes, so
    which axes broadcast is decided by each run."""
    f = TP.FLOAT
    nodes = [helper.make_node("Add", ["a", "b"], ["y"]),
             helper.make_node("Mul", ["y", "c"], ["yc"]),
             helper.make_node("MatMul", ["p", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "flat"], ["ms"]),
             helper.make_node("Reshape", ["yc", "flat"], ["yf"]),
             helper.make_node("Concat", ["yf", "ms"], ["logits"], axis=1)]
    g = helper.make_graph(nodes, "bcast", [
        helper.make_tensor_value_info("a", f, [None, None, None]),
        helper.make_tensor_value_info("b", f, [None, None]),
        helper.make_tensor_value_info("c", f, [None, None, None]),
        helper.make_tensor_value_info("p", f, [None, None, 3, 4]),
        helper.make_tensor_value_info("w", f, [None, 4, 2])],
        [helper.make_tensor_value_info("logits", f, [None, None])],
        [numpy_helper.from_array(np.asarray([0, -1], np.int64), "flat")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 13])
def test_broadcast_decided_at_run_time(opset):
    """Several run-time broadcast patterns through one augmented file (sizes 1 where the
    other operand has more, leading axes, MatMul batch axes), against numpy's sums."""
    aug = augment(_broadcast_graph(opset), wrt=["a", "b", "p", "w"], logits="logits")
    meta = {p.key: p.value for p in aug.metadata_props}
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cases = [((2, 1, 5), (3, 1), (2, 1, 3, 4), (5, 4, 2)),
             ((2, 4, 1), (1, 6), (2, 5, 3, 4), (1, 4, 2)),
             ((2, 3, 5), (3, 5), (2, 1, 3, 4), (1, 4, 2))]
    for sa, sb, sp, sw in cases:
        feeds = {k: rng.normal(size=s).astype(np.float32) for k, s in zip("abpw", (sa, sb, sp, sw))}
        y_shape = np.broadcast_shapes(sa, sb)
        feeds["c"] = rng.normal(size=y_shape).astype(np.float32)
        n = y_shape[0]
        assert sp[0] == n
        m_shape = np.broadcast_shapes(sp[:2], (sw[0],)) + (3, 2)
        ny = int(np.prod(y_shape[1:]))
        width = ny + int(np.prod(m_shape[1:]))
        seed = rng.normal(size=(2, n, width)).astype(np.float32)
        names = [meta[f"onnxsal.grad.{k}"] for k in "abpw"]
        got = dict(zip("abpw", sess.run(names, {**feeds, meta["onnxsal.seed"]: seed})))
        # the oracle: y's cotangent summed over the axes each operand was broadcast along
        dy = seed[:, :, :ny].reshape((2,) + y_shape) * feeds["c"]
        dm = seed[:, :, ny:].reshape((2,) + m_shape)
        da_full = dm @ np.swapaxes(feeds["w"], -1, -2)
        dw_full = np.swapaxes(feeds["p"], -1, -2) @ dm
        for k, full, shape in (("a", dy, sa), ("b", dy, sb), ("p", da_full, sp), ("w", dw_full, sw)):
            want = full.sum(axis=tuple(range(1, 1 + full.ndim - 1 - len(shape))))
            axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and want.shape[i + 1] != 1)
            want = want.sum(axis=axes, keepdims=True)
            assert got[k].shape == (2,) + shape, k
            np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-5)
