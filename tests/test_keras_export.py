"""converters.keras_export: Keras 3 models (object, .keras, .h5) to ONNX, NHWC kept, metadata,
parity with Keras, safe loading; the engine reads the NHWC layout from the metadata."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402  (the keras extra is installed in CI: no skip)
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from converters import keras_export as ke  # noqa: E402
from onnxsal.engine import Engine  # noqa: E402
from onnxsal.errors import ModelError, OptionError  # noqa: E402
from onnxsal.model import load_model  # noqa: E402


def tiny(channels: int = 2, classes: int = 3, size: int = 8):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((size, size, channels)),
                          keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                          keras.layers.MaxPooling2D(2),
                          keras.layers.Conv2D(5, 3, padding="same", activation="relu"),
                          keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(classes)])
    # non-zero biases, so that the exporter cannot drop them
    for layer in m.layers:
        if layer.weights:
            k, b = layer.get_weights()
            layer.set_weights([k, np.linspace(-0.3, 0.3, b.size).astype(np.float32)])
    return m


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).random((5, 8, 8, 2), dtype=np.float32)


@pytest.mark.parametrize("method", ["keras", "tf2onnx"])
def test_export_object_parity_metadata(model, x, tmp_path, method):
    out = tmp_path / "m.onnx"
    proto = ke.export(model, out, method=method, labels=["a", "b", "c"], preprocess="tf")
    assert proto.ir_version <= 10 and proto.opset_import[0].version == 17
    inp = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [8, 8, 2]          # dynamic batch, NHWC
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["onnxsal.labels"]) == ["a", "b", "c"]
    pre = json.loads(meta["onnxsal.preprocess"])
    assert pre["layout"] == "NHWC" and pre["scale"] == 2.0 and pre["mean"] == [1.0]
    p = ke.parity(model, out, x)
    assert p["max_abs_logit_diff"] < 1e-5 and p["argmax_agreement"] == 1.0
    onnx.checker.check_model(load_model(out), full_check=True)


def test_files_keras_and_h5(model, x, tmp_path):
    model.save(tmp_path / "m.keras")
    model.save(tmp_path / "m.h5")
    ref = np.asarray(model(x))
    for name in ("m.keras", "m.h5"):
        out = tmp_path / (name + ".onnx")
        ke.export(str(tmp_path / name), out)
        got = Engine(out, device="cpu", threads=1)
        # the engine takes NCHW [0, 1] pixels and transposes them to the model's NHWC itself
        np.testing.assert_allclose(got.logits(x.transpose(0, 3, 1, 2)), ref, atol=1e-5)


def test_engine_reads_recorded_nhwc_layout(model, x, tmp_path):
    """A 2-channel NHWC input [N, 8, 8, 2] looks NCHW to the shape heuristic; the recorded
    layout wins, so the raw input space is (2, 8, 8) and gradients match Keras's own."""
    import tensorflow as tf

    out = tmp_path / "m.onnx"
    ke.export(model, out, preprocess="x255")
    eng = Engine(out, device="cpu", threads=1)
    assert eng.input_shape == (2, 8, 8)
    t = np.array([0, 1, 2, 0, 1])
    logits, g = eng.gradient(x.transpose(0, 3, 1, 2), t)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        lk = model(xt * 255.0, training=False)
        s = tf.reduce_sum(tf.gather(lk, t, axis=1, batch_dims=1))
    ref = tape.gradient(s, xt).numpy().transpose(0, 3, 1, 2)
    np.testing.assert_allclose(logits, lk.numpy(), atol=1e-3)
    np.testing.assert_allclose(g, ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_input_shape_needed_when_model_does_not_declare(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(2, 3, activation="relu")(inp)
    m = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h)))
    with pytest.raises(OptionError, match="input"):
        ke.export(m, tmp_path / "m.onnx")
    proto = ke.export(m, tmp_path / "m.onnx", input_shape=(3, 10, 12))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [10, 12, 3]
    x = np.random.default_rng(0).random((2, 10, 12, 3), dtype=np.float32)
    assert ke.parity(m, tmp_path / "m.onnx", x)["max_abs_logit_diff"] < 1e-5


def test_safe_mode_refuses_lambda(tmp_path):
    m = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Lambda(lambda t: t * 2.0),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    m.save(tmp_path / "lam.keras")
    with pytest.raises(ModelError, match="arbitrary Python|safe"):
        ke.export(str(tmp_path / "lam.keras"), tmp_path / "out.onnx")


def test_option_errors(model, tmp_path):
    with pytest.raises(OptionError, match="opset"):
        ke.export(model, tmp_path / "m.onnx", opset=21)
    with pytest.raises(OptionError, match="labels"):
        ke.export(model, tmp_path / "m.onnx", labels=["only", "two"])
    with pytest.raises(OptionError, match="no such Keras model file"):
        ke.export(str(tmp_path / "missing.keras"), tmp_path / "m.onnx")


def test_cli_convert_keras_file(model, tmp_path):
    from onnxsal.cli import cli

    model.save(tmp_path / "m.keras")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["convert", "keras", str(tmp_path / "m.keras"), "-o", str(out),
                                   "--labels", str(labels), "--preprocess", "x255"])
    assert res.exit_code == 0, res.output
    assert "input [N,2,8,8] (NHWC in the file)" in res.output and "max abs logit diff" in res.output
    eng = Engine(out, device="cpu", threads=1)
    assert eng.labels == ["cat", "dog", "bird"] and eng.preprocess.scale == 255.0


def grouped_gelu(size: int = 32):
    """ConvNeXt's troublesome parts in small: a grouped convolution (Keras 3 runs it as an
    XLA-compiled function) and exact GELU (TensorFlow writes it with Erfc)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((size, size, 3)), keras.layers.Conv2D(8, 3, padding="same"),
                             keras.layers.Conv2D(8, 3, padding="same", groups=8),
                             keras.layers.Activation(lambda t: keras.activations.gelu(t, approximate=False)),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])


@pytest.mark.parametrize("arch", ["EfficientNetB0", "grouped_gelu"])
def test_keras_models_convert_and_differentiate(arch, tmp_path):
    """Models that Keras's own exporter leaves unrunnable (EfficientNet's Normalization
    constants as extra inputs; grouped convolutions as XLA StatefulPartitionedCalls, as in
    ConvNeXt; TF's Erfc GELU) convert through the frozen, inlined graph; logits and the
    gradients of every class match Keras's and tf.GradientTape's."""
    import tensorflow as tf

    if arch == "grouped_gelu":
        m = grouped_gelu()
    else:
        keras.utils.set_random_seed(0)
        m = getattr(keras.applications, arch)(weights=None, input_shape=(32, 32, 3), classes=4,
                                              classifier_activation=None)
    path = tmp_path / f"{arch}.onnx"
    proto = ke.export(m, path)
    assert [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}] == ["input"]
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    eng = Engine(path, device="cpu", threads=1, use_disk_cache=False)
    np.testing.assert_allclose(eng.logits(x.transpose(0, 3, 1, 2)), m(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-4)
    got = np.concatenate([g for _, g in eng.class_gradients(x.transpose(0, 3, 1, 2))])
    xt = tf.Variable(x)
    for k in range(4):
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(m(xt, training=False)[:, k])
        ref = tape.gradient(y, xt).numpy().transpose(0, 3, 1, 2)
        assert np.abs(got[k] - ref).max() <= 1e-4 * np.abs(ref).max(), (arch, k)
