"""A VGG-style Keras classifier (NHWC, Flatten head) through tf2onnx and through Keras's own
exporter: Grad-CAM's default layer is the Transpose back to NHWC before the Flatten, read
with its channels last; maps and input gradients against GradientTape."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# isort: off
import torch._dynamo  # noqa: E402,F401  (before tensorflow: see tests/conftest.py)
# isort: on
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from converters import keras_export as ke  # noqa: E402
from onnxsal.autodiff import augment  # noqa: E402
from onnxsal.engine import Engine  # noqa: E402
from onnxsal.methods import compute  # noqa: E402
from onnxsal.methods.cam import channel_axis  # noqa: E402
from onnxsal.model import dim_of, load_model  # noqa: E402

SIZE, CLASSES = 12, 4


@pytest.fixture(scope="module")
def keras_model():
    """conv-relu, pool, conv-relu (the Grad-CAM layer, 6x6x8), Flatten, Dense; non-zero
    biases so that no exporter drops them."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    act = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    logits = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(act))
    m = keras.Model(inp, logits)
    for layer in m.layers:
        if layer.weights:
            k, b = layer.get_weights()
            layer.set_weights([k, np.linspace(-0.3, 0.3, b.size).astype(np.float32)])
    return m, keras.Model(inp, [act, logits])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).random((3, SIZE, SIZE, 3), dtype=np.float32)


def tape_reference(both, x, targets):
    """(Grad-CAM coarse maps [N, 6, 6], d logit[target] / dx in NCHW) from GradientTape."""
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        act, logits = both(xt, training=False)
        score = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
    g_act, g_x = tape.gradient(score, [act, xt])
    alpha = tf.reduce_mean(g_act, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(alpha * act, axis=-1)).numpy()
    return cam, g_x.numpy().transpose(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["tf2onnx", "keras"])
def test_flatten_head_nhwc_gradcam_and_gradient(keras_model, x, tmp_path, method):
    model, both = keras_model
    path = tmp_path / f"{method}.onnx"
    ke.export(model, path, method=method)
    eng = Engine(path, device="cpu", threads=1, use_disk_cache=False)
    layer = eng.default_cam_layer()
    assert channel_axis(eng.model, layer) == 3  # [N, 6, 6, 8]: 8 channels, not 6
    targets = np.array([0, 2, 3])
    maps = compute(eng, x.transpose(0, 3, 1, 2), ["gradcam", "vanilla"], targets=targets)
    cam, ref_grad = tape_reference(both, x, targets)
    cam_onnx = maps["gradcam"].raw
    assert maps["gradcam"].info["layer_shape"] == [8, 6, 6]
    assert np.abs(cam_onnx - cam).max() <= 1e-5 * max(np.abs(cam).max(), 1e-3)
    _, grad = eng.gradient(x.transpose(0, 3, 1, 2), targets)
    assert np.abs(grad - ref_grad).max() <= 1e-5 * np.abs(ref_grad).max()


def test_tf2onnx_file_declares_seed_and_logits(keras_model, tmp_path):
    model, _ = keras_model
    path = tmp_path / "t.onnx"
    ke.export(model, path, method="tf2onnx")
    aug = augment(load_model(path))
    seed = next(i for i in aug.graph.input if i.name.startswith("onnxsal_seed"))
    dims = [dim_of(d) for d in seed.type.tensor_type.shape.dim]
    assert dims[0] == "K" and isinstance(dims[1], str) and dims[2] == CLASSES
    out = next(o for o in aug.graph.output if o.name == "logits")
    assert [dim_of(d) for d in out.type.tensor_type.shape.dim] == dims[1:]
