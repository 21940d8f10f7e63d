"""Shared fixtures: small real models exported from torch, and an onnxruntime runner."""

from __future__ import annotations

import io
import os

import numpy as np
import onnx
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# tensorflow (imported by the Keras tests) loaded before torch._dynamo makes the later import
# of triton segfault; import torch._dynamo first in every test process.
try:
    import torch._dynamo  # noqa: F401
except ImportError:
    pass


def export_torch(module, example, opset: int = 17, dynamo: bool = False) -> onnx.ModelProto:
    """Export a torch module with a dynamic batch axis (both exporters)."""
    import torch

    module = module.eval()
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        prog = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                 input_names=["x"], output_names=["logits"],
                                 dynamic_shapes=({0: batch},), verbose=False)
        model = prog.model_proto
    else:
        f = io.BytesIO()
        torch.onnx.export(module, example, f, opset_version=opset, input_names=["x"],
                          output_names=["logits"], dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
        model = onnx.load_from_string(f.getvalue())
    model.ir_version = min(model.ir_version, 10)
    return model


def run_augmented(aug: onnx.ModelProto, x: np.ndarray, seed: np.ndarray):
    """Run an augmented model on onnxruntime (CPU); return (logits, {tensor: gradient})."""
    import onnxruntime as ort

    meta = {p.key: p.value for p in aug.metadata_props}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(aug.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {meta["onnxsal.input"]: x, meta["onnxsal.seed"]: seed}
    names = [meta["onnxsal.logits"]] + [v for k, v in meta.items() if k.startswith("onnxsal.grad.")]
    outs = sess.run(names, feeds)
    grads = {k[len("onnxsal.grad."):]: outs[1 + i]
             for i, k in enumerate(k for k in meta if k.startswith("onnxsal.grad."))}
    return outs[0], grads


def identity_seed(num_classes: int, batch: int) -> np.ndarray:
    """[C, N, C] seed: row k selects class k for every image."""
    return np.repeat(np.eye(num_classes, dtype=np.float32)[:, None, :], batch, axis=1)


def torch_jacobian(module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and per-class input gradients [C, N, ...] by torch autograd (the oracle)."""
    import torch

    xt = torch.from_numpy(x).clone().requires_grad_(True)
    y = module(xt)
    grads = [torch.autograd.grad(y[:, k].sum(), xt, retain_graph=True)[0].numpy()
             for k in range(y.shape[1])]
    return y.detach().numpy(), np.stack(grads)


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for one test module (2 CPUs, one onnxruntime thread per worker)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, object_store_memory=200 << 20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
