"""Data loading: .npz layouts, folders with a corrupt file, grey/RGB/RGBA, NaN, built-ins."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from skimage import io as skio

from onnxsal.data import Dataset, conform, load_dataset, load_digits, load_fashion_mnist, load_raw
from onnxsal.errors import InputError


def _npz(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


# ---------------------------------------------------------------------------------------------
# .npz


def test_npz_uint8_nhw_scaled_and_labelled(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    p = _npz(tmp_path, x=x, y=np.array([1, 0]))
    d = load_dataset(p)
    assert d.images.dtype == np.float32 and d.images.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(d.images[:, 0], x.astype(np.float32) / 255)
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [1, 0]
    assert d.names == ["x[0]", "x[1]"] and d.notes == [] and d.failures == []


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_npz_float_channel_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    nchw = rng.random((3, 3, 5, 6)).astype(np.float32)
    x = nchw.transpose(0, 2, 3, 1) if layout == "NHWC" else nchw
    d = load_dataset(_npz(tmp_path, x=x))
    assert d.labels is None
    np.testing.assert_array_equal(d.images, nchw)


def test_npz_errors(tmp_path):
    with pytest.raises(InputError, match="'y' has shape"):
        load_dataset(_npz(tmp_path, "a.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, int)))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_dataset(_npz(tmp_path, "b.npz", x=np.full((2, 4, 4), 200.0)))
    with pytest.raises(InputError, match="no array 'x'"):
        load_dataset(_npz(tmp_path, "c.npz", images=np.zeros((2, 4, 4))))
    with pytest.raises(InputError, match="channel axis"):
        load_dataset(_npz(tmp_path, "d.npz", x=np.zeros((2, 7, 8, 9))))
    obj = np.empty(2, dtype=object)
    obj[:] = [np.zeros((2, 2)), np.zeros((3, 3))]
    with pytest.raises(InputError, match="unpickling"):
        load_dataset(_npz(tmp_path, "e.npz", x=obj))
    (tmp_path / "f.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a readable"):
        load_dataset(tmp_path / "f.npz")


def test_npz_nan_image_is_a_per_image_failure(tmp_path):
    x = np.random.default_rng(0).random((4, 5, 5)).astype(np.float32)
    x[1, 2, 2] = np.nan
    x[3, 0, 0] = np.inf
    d = load_dataset(_npz(tmp_path, x=x, y=np.arange(4)))
    assert d.names == ["x[0]", "x[2]"] and d.labels.tolist() == [0, 2]
    assert [n for n, _ in d.failures] == ["x[1]", "x[3]"]
    assert "NaN" in d.failures[0][1] and "Inf" in d.failures[1][1]
    np.testing.assert_array_equal(d.images[:, 0], x[[0, 2]])


def test_npz_one_hot_labels_and_limit(tmp_path):
    y = np.eye(3)[[2, 0, 1, 1]]
    d = load_dataset(_npz(tmp_path, x=np.zeros((4, 3, 3), np.uint8), y=y), limit=3)
    assert d.labels.tolist() == [2, 0, 1] and len(d) == 3
    assert any("one-hot" in n for n in d.notes)
    with pytest.raises(InputError, match="positive"):
        load_dataset(_npz(tmp_path, "z.npz", x=np.zeros((4, 3, 3), np.uint8)), limit=0)


# ---------------------------------------------------------------------------------------------
# folders and files


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    skio.imsave(str(path), arr, check_contrast=False)


def test_class_folders_with_a_corrupt_file(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("cat", "dog"):
        for k in range(2):
            a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            imgs[f"{cls}/{k}.png"] = a
            _write_png(tmp_path / cls / f"{k}.png", a)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    d = load_dataset(tmp_path)
    assert d.class_names == ["cat", "dog"]
    assert d.names == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert d.labels.tolist() == [0, 0, 1, 1]
    assert len(d.failures) == 1 and d.failures[0][0] == "dog/broken.png"
    assert "unreadable" in d.failures[0][1]
    np.testing.assert_allclose(d.images[2], imgs["dog/0.png"].transpose(2, 0, 1) / 255, atol=1e-7)


def test_flat_folder_has_no_labels_and_limit_stops_reading(tmp_path):
    for k in range(3):
        _write_png(tmp_path / f"im{k}.png", np.full((4, 4), 10 * k, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_dataset(tmp_path)
    assert d.labels is None and d.names == ["im0.png", "im1.png", "im2.png"]
    assert len(load_dataset(tmp_path, limit=2)) == 2
    with pytest.raises(InputError, match="no image files"):
        load_dataset(_empty(tmp_path))


def _empty(tmp_path):
    p = tmp_path / "empty_dir_for_test"
    p.mkdir(exist_ok=True)
    return p


def test_grey_rgb_rgba_conversions_are_reported(tmp_path):
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 255, 128, 0, 7
    grey = np.full((5, 5), 51, np.uint8)
    _write_png(tmp_path / "a_rgba.png", rgba)
    _write_png(tmp_path / "b_grey.png", grey)
    d = load_dataset([tmp_path / "a_rgba.png", tmp_path / "b_grey.png"], shape=(3, 5, 5))
    np.testing.assert_allclose(d.images[0][:, 0, 0], [1.0, 128 / 255, 0.0], atol=1e-7)
    np.testing.assert_allclose(d.images[1], 0.2, atol=1e-7)  # 51/255 in all three channels
    assert sorted(d.notes) == ["1 image alpha channel dropped", "1 image grey converted to RGB"]
    g = load_dataset([tmp_path / "a_rgba.png"], shape=(1, 5, 5))
    # rgb2gray luminance: 0.2125 R + 0.7154 G + 0.0721 B
    assert g.images[0, 0, 0, 0] == pytest.approx(0.2125 + 0.7154 * 128 / 255, abs=1e-5)
    assert g.notes == ["1 image alpha channel dropped, RGB converted to grey (luminance)"]


def test_resize_to_model_size(tmp_path):
    x = (np.random.default_rng(0).random((3, 8, 8)) * 255).astype(np.uint8)
    d = load_dataset(_npz(tmp_path, x=x), shape=(1, 28, 28))
    assert d.images.shape == (3, 1, 28, 28) and d.notes == ["3 images resized from 8x8 to 28x28"]
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0
    # bilinear: a constant image stays constant
    c = load_dataset(_npz(tmp_path, "c.npz", x=np.full((1, 8, 8), 0.25)), shape=(1, 3, 3))
    np.testing.assert_allclose(c.images, 0.25, atol=1e-6)


def test_mixed_sizes_need_a_target_size(tmp_path):
    _write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _write_png(tmp_path / "b.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(InputError, match="different sizes"):
        load_dataset(tmp_path, shape=(1, None, None))
    assert load_dataset(tmp_path, shape=(1, 4, 4)).images.shape == (2, 1, 4, 4)


def test_all_images_failing_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no usable image"):
        load_dataset(tmp_path)


def test_unknown_name_and_missing_file():
    with pytest.raises(InputError, match="built-in"):
        load_dataset("cifar-10")
    with pytest.raises(InputError, match="no such file"):
        load_dataset(["/nonexistent/a.png"])


# ---------------------------------------------------------------------------------------------
# built-in data sets


def _idx(path, arr, magic_dims):
    header = bytes([0, 0, 8, magic_dims]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_idx_files(tmp_path, monkeypatch):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = np.array([9, 2, 1, 1, 6], np.uint8)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", x, 3)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y, 1)
    monkeypatch.setenv("ONNXSAL_FASHION_MNIST_DIR", str(tmp_path))
    d = load_dataset("fashion-mnist", limit=4)
    assert d.images.shape == (4, 1, 28, 28) and d.labels.tolist() == [9, 2, 1, 1]
    np.testing.assert_array_equal(d.images[:, 0], x[:4] / np.float32(255))
    assert d.class_names[9] == "Ankle boot"
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist:train")
    # a truncated file is an error, not garbage
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 5, 28, 28) + b"\0" * 100)
    with pytest.raises(InputError, match="truncated"):
        load_fashion_mnist(root=tmp_path)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(InputError) as e:
        load_fashion_mnist(root=tmp_path / "nowhere")
    assert "`apt-get install dataset-fashion-mnist`" in str(e.value)


def test_digits():
    r = load_digits()
    assert len(r) == 1797 and r.images[0].shape == (8, 8, 1)
    assert sorted(set(r.labels.tolist())) == list(range(10))
    d = load_dataset("digits", limit=10)
    assert d.labels.tolist() == list(range(10)) and d.images.max() == 1.0  # 16/16


def test_skimage_samples_conformed_to_rgb():
    d = load_dataset("skimage-samples", shape=(3, 32, 32))
    assert d.names == ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins"]
    assert d.images.shape == (7, 3, 32, 32) and d.labels is None
    assert "3 images grey converted to RGB" in d.notes  # camera, horse (binary), coins


def test_dataset_round_trip_and_fingerprint():
    d = load_dataset("digits", limit=20)
    again = load_dataset(d, shape=(1, 8, 8))
    assert again.fingerprint() == d.fingerprint()
    assert conform(load_raw("digits", limit=20)).fingerprint() == d.fingerprint()
    assert isinstance(d.subset(slice(0, 5)), Dataset) and len(d.subset(slice(0, 5))) == 5
    assert d.subset(slice(0, 5)).fingerprint() != d.fingerprint()


# ---------------------------------------------------------------------------------------------
# property: whatever array an .npz holds, loading gives a Dataset or the project's own error

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64,
                           np.bool_, np.complex64])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=hnp.arrays(_dtypes, hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=6)),
       y=st.none() | hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
                                elements=st.integers(-3, 20)),
       shape=st.sampled_from([None, (1, 4, 4), (3, 5, 3)]))
def test_npz_fuzz_gives_a_dataset_or_an_input_error(tmp_path, x, y, shape):
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    p = tmp_path / "fuzz.npz"
    np.savez(p, **arrays)
    try:
        d = load_dataset(p, shape=shape)
    except InputError:
        return
    assert d.images.dtype == np.float32 and d.images.ndim == 4
    assert np.isfinite(d.images).all() and d.images.min() >= 0 and d.images.max() <= 1
    assert len(d.names) == len(d) and (d.labels is None or len(d.labels) == len(d))
