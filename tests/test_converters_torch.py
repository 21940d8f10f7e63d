"""converters.torch_export, benchmarks.models.paper_models, benchmarks.models.training and the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from benchmarks.models.paper_models import build, paper_cnn, paper_resnet18  # noqa: E402
from converters.torch_export import export, parity, preprocess_spec, read_labels  # noqa: E402
from onnxsal.errors import InputError, OptionError  # noqa: E402

DATA = Path(__file__).parent / "data"


def _ort(path_or_model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    s = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _meta(model):
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def small_cnn():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return paper_cnn(5, in_channels=3, widths=(4, 8, 8)).eval()


@pytest.mark.parametrize("dynamo,opset", [(False, 13), (False, 17), (True, 18)])
def test_export_parity_dynamic_batch_and_metadata(small_cnn, tmp_path, dynamo, opset):
    path = tmp_path / "m.onnx"
    labels = ["a", "b", "c", "d", "e"]
    export(small_cnn, (3, 16, 16), path, opset=opset, dynamo=dynamo, preprocess="imagenet", labels=labels)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version <= 10
    assert max(i.version for i in m.opset_import if i.domain in ("", "ai.onnx")) == opset
    meta = _meta(m)
    pre = json.loads(meta["onnxsal.preprocess"])
    assert pre == {"scale": 1.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                   "bgr": False, "layout": "NCHW"}
    assert json.loads(meta["onnxsal.labels"]) == labels
    # the batch axis is symbolic and batches the exporter never saw run
    assert not m.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    rng = np.random.default_rng(1)
    for n in (1, 7):
        x = rng.random((n, 3, 16, 16), dtype=np.float32)
        with torch.no_grad():
            ref = small_cnn(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_ort(path, x), ref, atol=1e-5, rtol=1e-4)
    p = parity(small_cnn, path, rng.random((6, 3, 16, 16), dtype=np.float32))
    assert p["max_abs_logit_diff"] < 1e-5 and p["argmax_agreement"] == 1.0 and p["n"] == 6


def test_metadata_read_back_by_onnxsal(small_cnn):
    from onnxsal.preprocess import from_model, labels_from_model

    m = export(small_cnn, (2, 3, 16, 16), None, preprocess="scale=255 mean=1,2,3 std=4 bgr",
               labels=[str(i) for i in range(5)])
    spec = from_model(m)
    assert (spec.scale, spec.mean, spec.std, spec.bgr, spec.layout) == (255.0, (1.0, 2.0, 3.0), (4.0,), True, "NCHW")
    assert labels_from_model(m) == ["0", "1", "2", "3", "4"]
    none = from_model(export(small_cnn, (3, 16, 16), None, preprocess="none"))
    assert none.is_identity()


def test_parity_detects_a_different_model(small_cnn, tmp_path):
    path = tmp_path / "m.onnx"
    export(small_cnn, (3, 16, 16), path)
    torch.manual_seed(1)
    other = paper_cnn(5, in_channels=3, widths=(4, 8, 8)).eval()
    p = parity(other, path, np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32))
    assert p["max_abs_logit_diff"] > 1e-3


def test_export_rejects_bad_options(small_cnn, tmp_path):
    with pytest.raises(OptionError, match="opset >= 18"):
        export(small_cnn, (3, 16, 16), None, opset=17, dynamo=True)
    with pytest.raises(OptionError, match="legacy exporter"):
        export(small_cnn, (3, 16, 16), None, opset=12)
    with pytest.raises(OptionError, match="3 labels"):
        export(small_cnn, (3, 16, 16), None, labels=["a", "b", "c"])
    with pytest.raises(OptionError):
        export(small_cnn, (16, 16), None)
    with pytest.raises(OptionError):
        preprocess_spec({"scale": 1, "colour": "red"})
    with pytest.raises(OptionError):
        preprocess_spec("std=0")


def test_read_labels_formats(tmp_path):
    (tmp_path / "a.txt").write_text("cat\ndog\n\n")
    (tmp_path / "b.json").write_text('["x", "y"]')
    (tmp_path / "c.json").write_text('{"1": "dog", "0": "cat"}')
    assert read_labels(tmp_path / "a.txt") == ["cat", "dog"]
    assert read_labels(str(tmp_path / "b.json")) == ["x", "y"]
    assert read_labels(tmp_path / "c.json") == ["cat", "dog"]
    with pytest.raises(InputError):
        read_labels(tmp_path / "missing.txt")


def test_paper_cnn_architecture():
    m = paper_cnn(10, in_channels=3)
    convs = [layer for layer in m if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (3, 32, 7, 2, 3),
        (32, 32, 3, 1, 1), (32, 32, 3, 2, 1), (32, 32, 3, 1, 1),
        (32, 64, 3, 1, 1), (64, 64, 3, 2, 1), (64, 64, 3, 1, 1),
        (64, 128, 3, 1, 1), (128, 128, 3, 2, 1), (128, 128, 3, 1, 1)]
    assert not any(isinstance(layer, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for layer in m)
    pool = [layer for layer in m if isinstance(layer, torch.nn.MaxPool2d)][0]
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert isinstance(m[-1], torch.nn.Linear) and (m[-1].in_features, m[-1].out_features) == (128, 10)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_paper_resnet18_grey_input():
    m = paper_resnet18(7, in_channels=1).eval()
    assert m.conv1.in_channels == 1 and m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    assert isinstance(m.maxpool, torch.nn.MaxPool2d) and m.fc.out_features == 7
    with torch.no_grad():
        assert m(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(ValueError):
        build("vgg")


def test_train_helper_learns_and_state_round_trips(tmp_path):
    from benchmarks.models.training import evaluate, load_sklearn_digits, load_state, save_state, train

    pytest.importorskip("sklearn")
    xtr, ytr, xte, yte = load_sklearn_digits(size=16)
    assert xtr.shape[1:] == (1, 16, 16) and 0.0 <= xtr.min() and xtr.max() <= 1.0
    def net():  # small and quick to fit: this tests the helper, not the paper's architecture
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 10))

    torch.manual_seed(0)
    m = net()
    res = train(m, xtr, ytr, xte, yte, epochs=5, log=None)
    assert res.test_accuracy > 0.8  # chance is 0.1
    assert res.history[-1]["train_loss"] < 0.7 * res.history[0]["train_loss"]
    save_state(m, tmp_path / "w.pt")
    m2 = load_state(net(), tmp_path / "w.pt")
    assert evaluate(m2, xte, yte) == res.test_accuracy


def test_bundled_model_is_real_and_accurate():
    from onnxsal.model import find_image_input, load_model
    from onnxsal.preprocess import from_model, labels_from_model

    m = load_model(DATA / "digits_cnn.onnx")
    assert (DATA / "digits_cnn.onnx").stat().st_size < 1 << 20
    assert find_image_input(m).shape[1:] == [1, 20, 20]
    assert from_model(m).is_identity() and labels_from_model(m) == [str(i) for i in range(10)]
    with np.load(DATA / "digits_sample.npz", allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    assert x.shape == (200, 1, 20, 20) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    pred = _ort(m, x.astype(np.float32) / 255.0).argmax(1)
    assert (pred == y).mean() >= 0.85  # 0.93 when built; chance is 0.1
