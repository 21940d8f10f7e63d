"""Models saved after onnxruntime's graph optimizations (com.microsoft fused operators):
written back as standard ONNX and differentiated; gradients against torch autograd."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from onnxsal.engine import Engine

from conftest import export_torch, torch_jacobian

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn


class Block(nn.Module):
    """Conv + ReLU, Conv + ReLU6, a residual Conv + Add + ReLU, SiLU, and a transformer-style
    tail (Linear + GELU, residual Add + LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.clamp(self.c2(h), 0, 6)
        h = torch.relu(self.c3(h) + h)
        h = nn.functional.silu(self.c4(h))
        t = h.flatten(2).transpose(1, 2)  # [N, HW, 8]
        t = self.ln(t + self.fc2(nn.functional.gelu(self.fc1(t))))
        return self.head(t.mean(1))


def test_onnxruntime_optimized_model_gradients(tmp_path):
    torch.manual_seed(0)
    net = Block().eval()
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    plain = tmp_path / "plain.onnx"
    onnx.save(export_torch(net, torch.from_numpy(x[:1])), plain)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"])
    fused = onnx.load(tmp_path / "fused.onnx")
    ops = collections.Counter(n.op_type for n in fused.graph.node if n.domain == "com.microsoft")
    assert ops["FusedConv"] >= 2, ops  # the fusions this test is about did happen
    from onnxsal.inspect import summarize
    from onnxsal.model import load_model

    summary = summarize(load_model(tmp_path / "fused.onnx"))
    assert any("fused operators written back" in n and "FusedConv" in n for n in summary.notes)
    assert all(v["differentiable"] or not v["needs_rule"] for v in summary.operators.values())
    eng = Engine(tmp_path / "fused.onnx", device="cpu", use_disk_cache=False)  # validated as a file
    ref_logits, ref = torch_jacobian(net, x)
    np.testing.assert_allclose(eng.logits(x), ref_logits, atol=1e-5)
    for cls, g in eng.class_gradients(x):
        np.testing.assert_allclose(g, ref[cls], atol=2e-5 * np.abs(ref).max())


def test_lowered_operators_match_onnxruntime_kernels():
    """Each written-back operator computes what onnxruntime's fused kernel computes."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxsal.contrib import lower

    rng = np.random.default_rng(1)
    f = numpy_helper.from_array
    x = rng.standard_normal((2, 4, 6), dtype=np.float32)
    img = rng.standard_normal((2, 3, 5, 5), dtype=np.float32)
    inits = [f(rng.standard_normal(6).astype(np.float32), "b"),
             f(rng.standard_normal((2, 4, 6)).astype(np.float32), "skip"),
             f(rng.random(6).astype(np.float32) + 0.5, "gamma"), f(rng.standard_normal(6).astype(np.float32), "beta"),
             f(rng.standard_normal((6, 4)).astype(np.float32), "w"),
             f(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "k"),
             f(rng.standard_normal(4).astype(np.float32), "kb")]
    ms = "com.microsoft"
    cases = [helper.make_node("BiasGelu", ["x", "b"], ["y"], domain=ms),
             helper.make_node("Gelu", ["x"], ["y"], domain=ms),
             helper.make_node("FastGelu", ["x", "b"], ["y"], domain=ms),
             helper.make_node("QuickGelu", ["x"], ["y"], domain=ms, alpha=1.5),
             helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain=ms, alpha=0.5, transB=1),
             helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "b"], ["y"], domain=ms,
                              epsilon=1e-5)]
    convs = [helper.make_node("FusedConv", ["img", "k", "kb"], ["y"], domain=ms, activation=act,
                              **({"activation_params": p} if p else {}), pads=[1, 1, 1, 1])
             for act, p in (("Relu", []), ("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.7]), ("HardSigmoid", [0.3, 0.4]),
                            ("Sigmoid", []), ("Tanh", []))]
    for node in cases + convs:
        if node.op_type == "FusedMatMul":
            inits[4] = f(rng.standard_normal((4, 6)).astype(np.float32), "w")  # transB: [4, 6] -> [6, 4]
        inp = "img" if node.op_type == "FusedConv" else "x"
        shape = list(img.shape if inp == "img" else x.shape)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
        m.ir_version = 8
        low = lower(m)
        assert all(n.domain in ("", "ai.onnx") for n in low.graph.node), node.op_type
        feed = {inp: img if inp == "img" else x}
        want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        got = ort.InferenceSession(low.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=node.op_type)
