"""The engine: sessions, batching, class-gradient chunks, cache, and the preprocessing prefix."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsal.engine import Engine
from onnxsal.errors import InputError, OptionError
from onnxsal.runtime import pick_providers

from conftest import export_torch, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn


def _cnn(in_ch=3, classes=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(in_ch, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes)).eval()


class Wrapped(nn.Module):
    """The same CNN behind a 0..255 BGR NHWC input with mean/std inside the graph."""

    def __init__(self, core, mean, std):
        super().__init__()
        self.core = core
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):  # x: [N, H, W, 3] BGR, 0..255
        x = x.permute(0, 3, 1, 2).flip(1) / 255.0
        return self.core((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def cnn_engine(tmp_path_factory):
    m = _cnn()
    model = export_torch(m, torch.randn(2, 3, 12, 12))
    return m, Engine(model, device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def test_gradient_and_class_gradients_match_torch(cnn_engine):
    m, eng = cnn_engine
    assert eng.input_shape == (3, 12, 12) and eng.num_classes == 4
    assert eng.provider == "CPUExecutionProvider"
    x = np.random.default_rng(0).random((5, 3, 12, 12), dtype=np.float32)
    ref_logits, ref = torch_jacobian(m, x)
    logits, g = eng.gradient(x)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    pred = ref_logits.argmax(1)
    np.testing.assert_allclose(g, ref[pred, np.arange(5)], atol=1e-5 * np.abs(ref).max() + 1e-7)
    seen = []
    for cls, grads in eng.class_gradients(x, chunk=3):
        seen.extend(cls.tolist())
        np.testing.assert_allclose(grads, ref[cls], atol=1e-5 * np.abs(ref).max() + 1e-7)
    assert seen == [0, 1, 2, 3]


def test_bad_images_and_targets(cnn_engine):
    _, eng = cnn_engine
    with pytest.raises(InputError, match="shape"):
        eng.logits(np.zeros((1, 1, 12, 12), np.float32))
    with pytest.raises(OptionError, match="out of range"):
        eng.gradient(np.zeros((1, 3, 12, 12), np.float32), targets=[7])


def test_disk_cache_reused(tmp_path):
    m = _cnn()
    model = export_torch(m, torch.randn(1, 3, 12, 12))
    e1 = Engine(model, device="cpu", cache_dir=tmp_path)
    e1.gradient(np.zeros((1, 3, 12, 12), np.float32))
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    e2 = Engine(model, device="cpu", cache_dir=tmp_path)
    e2.augmented()
    assert list(tmp_path.glob("*.onnx")) == files


def test_preprocessing_prefix_gives_the_same_maps(tmp_path):
    core = _cnn()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    plain = Engine(export_torch(core, torch.randn(1, 3, 12, 12)), device="cpu", cache_dir=tmp_path,
                   preprocess=f"mean={','.join(map(str, mean))} std={','.join(map(str, std))}")
    wrapped_model = export_torch(Wrapped(core, mean, std), torch.rand(1, 12, 12, 3) * 255)
    wrapped = Engine(wrapped_model, device="cpu", cache_dir=tmp_path, preprocess="scale=255 bgr nhwc")
    assert wrapped.input_shape == (3, 12, 12)
    x = np.random.default_rng(3).random((3, 3, 12, 12), dtype=np.float32)
    l1, g1 = plain.gradient(x, targets=[0, 1, 2])
    l2, g2 = wrapped.gradient(x, targets=[0, 1, 2])
    np.testing.assert_allclose(l1, l2, atol=1e-4)
    np.testing.assert_allclose(g1, g2, atol=1e-4 * np.abs(g1).max())


def test_device_choice():
    assert pick_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OptionError):
        pick_providers("tpu")


def test_simplified_gradient_model_matches_and_is_smaller(tmp_path):
    """onnxruntime's basic optimizations before the pass: same gradients, fewer nodes."""
    from onnxsal.simplify import simplify

    torch.manual_seed(2)
    m = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    with torch.no_grad():
        m[2].running_mean.uniform_(-1, 1)
        m[2].running_var.uniform_(0.5, 2)
    model = export_torch(m, torch.randn(1, 3, 10, 10))
    small = simplify(model)
    assert len(small.graph.node) < len(model.graph.node)
    assert {n.op_type for n in small.graph.node} & {"Pad", "BatchNormalization"} == set()
    x = np.random.default_rng(4).random((3, 3, 10, 10), dtype=np.float32)
    grads = [Engine(model, device="cpu", cache_dir=tmp_path, simplify=s).gradient(x, targets=[0, 1, 2])[1]
             for s in (False, True)]
    _, ref = torch_jacobian(m, x)
    for g in grads:
        np.testing.assert_allclose(g, ref[[0, 1, 2], np.arange(3)], atol=1e-5 * np.abs(ref).max())


def test_guided_backprop_treats_relu6_as_a_relu(tmp_path):
    torch.manual_seed(3)
    m6 = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU6(), nn.Conv2d(5, 5, 3, padding=1),
                       nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    eng = Engine(export_torch(m6, torch.randn(1, 3, 8, 8)), device="cpu", cache_dir=tmp_path)
    x = np.random.default_rng(5).random((2, 3, 8, 8), dtype=np.float32)
    _, guided = eng.gradient(x, targets=[0, 1], rules="guided")
    # oracle: torch with guided hooks at every ReLU6 (mask of the clip times max(dy, 0))
    xt = torch.from_numpy(x).requires_grad_(True)
    hooks = [mod.register_full_backward_hook(lambda mod, gi, go: (torch.clamp(gi[0], min=0),))
             for mod in m6 if isinstance(mod, nn.ReLU6)]
    out = m6(xt)
    out[[0, 1], [0, 1]].sum().backward()
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(guided, xt.grad.numpy(), atol=1e-5 * np.abs(xt.grad.numpy()).max())


def test_float16_model(cnn_engine):
    """A vendor's float16 file (made by onnxconverter-common, as vendors do): the engine feeds
    images and seeds in the model's type and returns float32; the gradients are those of the
    model's own float16 arithmetic, so they match torch's float32 ones to that precision."""
    import onnx

    float16 = pytest.importorskip("onnxconverter_common.float16")
    m, eng = cnn_engine
    model = float16.convert_float_to_float16(eng.source_model, keep_io_types=False)
    low = Engine(model, device="cpu", use_disk_cache=False)
    assert low.source_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    from onnxsal.inspect import summarize

    assert any(n.startswith("float16 model") for n in summarize(model).notes)
    x = np.random.default_rng(4).random((3, 3, 12, 12), dtype=np.float32)
    ref_logits, ref = torch_jacobian(m, x)
    logits = low.logits(x)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits, atol=2e-2 * np.abs(ref_logits).max())
    for cls, grads in low.class_gradients(x):
        assert grads.dtype == np.float32
        np.testing.assert_allclose(grads, ref[cls], atol=2e-2 * np.abs(ref).max())
