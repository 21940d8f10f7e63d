"""The gradient pass on small torch CNNs against torch autograd, both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxsal.autodiff import augment

from conftest import export_torch, identity_seed, run_augmented, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn


def small_cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AvgPool2d(2), nn.Conv2d(16, 16, 1), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5), nn.Softmax(dim=1))
    with torch.no_grad():
        m[4].running_mean.uniform_(-1, 1)
        m[4].running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_small_cnn_matches_torch(dynamo):
    m = small_cnn()
    logits_module = m[:-1]  # the pass explains the Softmax's input
    model = export_torch(m, torch.randn(2, 3, 16, 16), dynamo=dynamo)
    aug = augment(model)
    onnx.checker.check_model(aug, full_check=True)
    assert {n.domain for n in aug.graph.node} <= {"", "ai.onnx"}
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)
        logits, grads = run_augmented(aug, x, identity_seed(5, n))
        ref_logits, ref = torch_jacobian(logits_module, x)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
        g = next(iter(grads.values()))
        assert g.shape == (5, n, 3, 16, 16)
        assert np.abs(g - ref).max() <= 1e-4 * np.abs(ref).max()


def test_unsupported_operator_names_every_node():
    from onnx import TensorProto, helper

    from onnxsal.errors import UnsupportedOperatorError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])
    # made-up operator types: a real one would break this test the day it gets a rule
    nodes = [helper.make_node("MadeUpPool", ["x"], ["h"], name="hm1"),
             helper.make_node("MadeUpDet", ["h"], ["d"], name="det1"),
             helper.make_node("Flatten", ["d"], ["y"], name="fl")]
    g = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError) as err:
        augment(model)
    msg = str(err.value)
    assert "MadeUpPool (nodes: hm1)" in msg and "MadeUpDet (nodes: det1)" in msg
