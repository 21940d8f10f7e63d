"""Data-parallel runs (Engine(threads > 1)): the batch is split over concurrent one-thread runs
(by images, else by seed rows, else one run with all threads); results match torch autograd."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsal.engine import Engine

from conftest import export_torch, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture(scope="module")
def model_and_engine(tmp_path_factory):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 5)).eval()
    model = export_torch(m, torch.randn(2, 3, 16, 16))
    eng = Engine(model, device="cpu", threads=3, cache_dir=tmp_path_factory.mktemp("cache"))
    return m, eng


@pytest.mark.parametrize("n", [7, 2, 1])  # split by images / by seed rows / no split
def test_parallel_runs_match_torch(model_and_engine, n):
    m, eng = model_and_engine
    assert eng.parallel == 3
    x = np.random.default_rng(n).random((n, 3, 16, 16), dtype=np.float32)
    ref_logits, ref = torch_jacobian(m, x)  # [classes, N, C, H, W]
    np.testing.assert_allclose(eng.logits(x), ref_logits, atol=1e-5)
    tol = 1e-5 * np.abs(ref).max() + 1e-7
    seen = []
    for cls, grads in eng.class_gradients(x, chunk=4):  # chunks of 4 and 1 seed rows
        assert grads.shape == (len(cls), n, 3, 16, 16)
        np.testing.assert_allclose(grads, ref[cls], atol=tol)
        seen += cls.tolist()
    assert seen == list(range(5))
    logits, g = eng.gradient(x, targets=np.arange(n) % 5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(g, ref[np.arange(n) % 5, np.arange(n)], atol=tol)


def test_intermediate_values_and_gradients_split(model_and_engine):
    m, eng = model_and_engine
    layer = eng.default_cam_layer()
    x = np.random.default_rng(9).random((5, 3, 16, 16), dtype=np.float32)
    seeds = np.random.default_rng(1).standard_normal((2, 5, 5)).astype(np.float32)
    r = eng.vjp(x, seeds, wrt=[layer])
    one = Engine(eng.source_model, device="cpu", threads=1, use_disk_cache=False)
    assert one.parallel == 1
    r1 = one.vjp(x, seeds, wrt=[layer])
    np.testing.assert_allclose(r.values[layer], r1.values[layer], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.grads[layer], r1.grads[layer], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.logits, r1.logits, rtol=1e-5, atol=1e-6)
