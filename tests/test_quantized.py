"""Quantized (QDQ) models: straight-through gradients against torch's fake quantization, and a
file made by onnxruntime's own quantization tool run end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.autodiff import augment
from onnxsal.engine import Engine

from conftest import identity_seed, run_augmented

torch = pytest.importorskip("torch")


def _qdq_model(w_int, w_scale, bias, fc, s_in, s_act, zp_act):
    """x -> Q/DQ (uint8) -> Conv (int8 per-channel weights, dequantized) -> Q/DQ (uint8, its
    range clips at 0 as a fused ReLU would) -> Flatten -> Gemm."""
    f = numpy_helper.from_array
    inits = [f(w_int, "w_q"), f(w_scale, "w_s"), f(np.zeros(len(w_scale), np.int8), "w_z"), f(bias, "b"),
             f(fc, "fc"), f(np.asarray(s_in, np.float32), "s_in"), f(np.asarray(0, np.uint8), "z_in"),
             f(np.asarray(s_act, np.float32), "s_a"), f(np.asarray(zp_act, np.uint8), "z_a")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["xd", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s_a", "z_a"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s_a", "z_a"], ["cd"]),
             helper.make_node("Flatten", ["cd"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_qdq_gradient_is_torch_fake_quant_straight_through():
    """torch.fake_quantize_* backward is the straight-through estimator with the clipping mask:
    the oracle for the gradient of the same quantized function."""
    rng = np.random.default_rng(0)
    w_int = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w_scale = rng.uniform(0.002, 0.01, 4).astype(np.float32)
    bias = rng.normal(0, 0.1, 4).astype(np.float32)
    fc = rng.normal(0, 1, (5, 64)).astype(np.float32)
    s_in, s_act, zp_act = 1 / 255, 0.004, 0  # the activation range [0, 1.02] clips both ends
    aug = augment(_qdq_model(w_int, w_scale, bias, fc, s_in, s_act, zp_act))
    x = rng.uniform(-0.2, 1.2, (3, 3, 4, 4)).astype(np.float32)  # some inputs clip too
    logits, grads = run_augmented(aug, x, identity_seed(5, 3))

    xt = torch.from_numpy(x).requires_grad_(True)
    w = torch.from_numpy(w_int.astype(np.float32) * w_scale[:, None, None, None])
    h = torch.fake_quantize_per_tensor_affine(xt, s_in, 0, 0, 255)
    h = torch.nn.functional.conv2d(h, w, torch.from_numpy(bias), padding=1)
    h = torch.fake_quantize_per_tensor_affine(h, s_act, zp_act, 0, 255)
    y = h.flatten(1) @ torch.from_numpy(fc).T
    ref = np.stack([torch.autograd.grad(y[:, k].sum(), xt, retain_graph=True)[0].numpy() for k in range(5)])
    np.testing.assert_allclose(logits, y.detach().numpy(), atol=1e-4)
    clipped = (x < 0) | (x > 1)
    assert clipped.any() and np.all(grads["x"][:, clipped] == 0)  # the input's clipping stops it
    np.testing.assert_allclose(grads["x"], ref, atol=1e-5 * np.abs(ref).max())


def test_onnxruntime_quantized_model_end_to_end(tmp_path):
    """A model quantized by onnxruntime.quantization (QDQ, per-channel int8 weights, uint8
    activations, ReLUs folded into the activation ranges): the augmented model's forward is the
    quantized model's own, and its straight-through gradients point where the float model's do."""
    quant = pytest.importorskip("onnxruntime.quantization")
    from conftest import export_torch

    nn = torch.nn
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 6)).eval()
    x = np.random.default_rng(1).random((6, 3, 16, 16), dtype=np.float32)
    float_path, q_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(export_torch(net, torch.from_numpy(x[:1])), float_path)

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.it, None)

    quant.quantize_static(str(float_path), str(q_path), Reader(), quant_format=quant.QuantFormat.QDQ,
                          per_channel=True, activation_type=quant.QuantType.QUInt8,
                          weight_type=quant.QuantType.QInt8)
    qmodel = onnx.load(q_path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qmodel.graph.node}
    from onnxsal.inspect import summarize

    assert any("straight-through" in n for n in summarize(qmodel).notes)  # inspect says so
    import onnxruntime as ort

    plain = ort.InferenceSession(str(q_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    eq, ef = (Engine(p, device="cpu", use_disk_cache=False) for p in (q_path, float_path))
    np.testing.assert_allclose(eq.logits(x), plain, atol=1e-6)
    gq = np.concatenate([g for _, g in eq.class_gradients(x)])
    gf = np.concatenate([g for _, g in ef.class_gradients(x)])
    assert np.isfinite(gq).all() and np.abs(gq).max() > 0
    cos = (gq * gf).sum() / np.linalg.norm(gq) / np.linalg.norm(gf)
    assert cos > 0.8, cos


def test_qoperator_model_is_refused_by_name():
    """The QOperator form computes in integers between QuantizeLinear and DequantizeLinear: the
    path is reported at those operators instead of being cut without a word (zero gradients)."""
    from onnxsal.errors import UnsupportedOperatorError

    rng = np.random.default_rng(0)
    f = numpy_helper.from_array
    inits = [f(np.asarray(1 / 255, np.float32), "s"), f(np.asarray(0, np.uint8), "z"),
             f(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "w"),
             f(np.asarray(0.01, np.float32), "ws"), f(np.asarray(128, np.uint8), "wz"),
             f(np.asarray(0.05, np.float32), "ys"), f(np.asarray(0, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "s", "z", "w", "ws", "wz", "ys", "yz"], ["cq"], name="qconv"),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    g = helper.make_graph(nodes, "qop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOperatorError, match="QLinearConv.*qconv"):
        augment(m)
