"""Resource bombs: small files that decode or compute to gigabytes.

Images are refused from their header (before decoding) beyond the pixel cap, each with its
own failure line while the other images go on; a model whose shape-inferred tensors exceed
the engine's memory budget is refused before any onnxruntime session exists.
"""

from __future__ import annotations

import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal.errors import InputError, ModelError

sys.path.insert(0, str(Path(__file__).parent))
from test_hostile import one_error_line, run_main, save, tiny  # noqa: E402


def png_bomb(path: Path, w: int = 12500, h: int = 12500) -> Path:
    """A 1-bit grey PNG of w x h zero pixels (156 MP by default), written row by row: ~19 KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, w: int = 40000, h: int = 40000) -> Path:
    """An uncompressed 8-bit grey TIFF whose header claims w x h pixels (1.6 GP): ~1 KB."""
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, w * h),
            (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0\0\0\0"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 1024)
    return path


def bomb_model(kind: str) -> onnx.ModelProto:
    """x [N, 3, 4, 4] -> logits [N, 2], plus the mean of a huge constant tensor: a
    ConstantOfShape of a constant shape, or an Expand to a shape computed from Shape(x)."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])]
    inits = [numpy_helper.from_array(np.full((48, 2), 0.1, np.float32), "W")]
    if kind == "ConstantOfShape":
        inits.append(numpy_helper.from_array(np.array([1 << 15, 1 << 15], np.int64), "shp"))
        nodes.append(helper.make_node("ConstantOfShape", ["shp"], ["big"], name="bomb",
                                      value=numpy_helper.from_array(np.array([1.0], np.float32))))
    else:
        inits += [numpy_helper.from_array(np.array([64], np.int64), "k"),
                  numpy_helper.from_array(np.array([1.0], np.float32), "one")]
        nodes += [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "k"], ["s2"]),
                  helper.make_node("Expand", ["one", "s2"], ["big"], name="bomb")]
    nodes += [helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0),
              helper.make_node("Add", ["y", "m"], ["logits"])]
    g = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def folder(tmp_path):
    """A good 300x400 photograph beside a PNG and a TIFF bomb."""
    from skimage import io as skio

    d = tmp_path / "imgs"
    d.mkdir()
    skio.imsave(d / "good.png", (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8),
                check_contrast=False)
    png_bomb(d / "bomb.png")
    tiff_bomb(d / "bomb.tif")
    return d


def test_bombs_fail_one_by_one_and_the_good_image_goes_on(folder):
    from onnxsal.data import load_dataset

    t0 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds = load_dataset(folder, shape=(3, 32, 32))
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024  # KB: nothing decoded
    assert ds.names == ["good.png"] and ds.images.shape == (1, 3, 32, 32)
    failures = dict(ds.failures)
    assert failures["bomb.png"].startswith("12500x12500 pixels (156 megapixels) exceed the 64-megapixel cap")
    assert failures["bomb.tif"].startswith("40000x40000 pixels (1600 megapixels) exceed the 64-megapixel cap")


def test_the_cap_is_set_by_the_environment(folder, monkeypatch):
    from onnxsal.data import load_dataset

    monkeypatch.setenv("ONNXSAL_MAX_PIXELS", "100000")  # the good image has 120000
    with pytest.raises(InputError, match="no usable image"):
        load_dataset(folder / "good.png")
    monkeypatch.setenv("ONNXSAL_MAX_PIXELS", "lots")
    with pytest.raises(InputError, match="ONNXSAL_MAX_PIXELS='lots' is not a positive number"):
        load_dataset(folder / "good.png")


def test_cli_explains_the_good_image_beside_the_bombs(folder, tmp_path):
    m = save(tiny(hw=32), tmp_path / "m.onnx")
    code, _, err = run_main(["explain", m, folder, "--out", tmp_path / "out", "--method", "gradient",
                               "--device", "cpu"])
    assert code == 0, err
    assert "bomb.png: 12500x12500 pixels" in err and "bomb.tif: 40000x40000 pixels" in err
    with np.load(tmp_path / "out" / "maps.npz") as maps:
        assert [k.split("/")[0] for k in maps.files] == ["good"]


def test_large_reduction_matches_an_area_average_cheaply():
    """A 4000x6000 image brought to 40x60: the box pre-filter gives the block means (the
    exact area average), within the small blur that follows, and costs little."""
    from onnxsal.data import _resize

    rng = np.random.default_rng(0)
    small = rng.random((40, 60, 3)).astype(np.float32)
    big = np.repeat(np.repeat(small, 100, axis=0), 100, axis=1)
    t0 = time.perf_counter()
    out = _resize(big, (40, 60))
    assert time.perf_counter() - t0 < 5
    assert out.shape == (40, 60, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, small, atol=1e-5)


@pytest.mark.parametrize("kind", ["ConstantOfShape", "Expand"])
def test_a_model_bomb_is_refused_before_any_session(kind, monkeypatch):
    import onnxruntime as ort

    from onnxsal.engine import Engine

    def no_session(*a, **k):
        raise AssertionError("a session was created")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    with pytest.raises(ModelError, match=rf"node 'bomb' \({kind}\) makes tensor 'big' of shape .* "
                                         r"beyond the 2048 MiB memory budget: refused"):
        Engine(bomb_model(kind), device="cpu", use_disk_cache=False)


def test_a_model_bomb_under_a_larger_budget_is_still_bounded(monkeypatch):
    """The check follows the budget: 4 GiB of ConstantOfShape passes a 5 GiB budget's check
    (here only the check is run, not the model)."""
    from onnxsal.model import check_tensor_sizes

    check_tensor_sizes(bomb_model("ConstantOfShape"), 5 << 30)
    with pytest.raises(ModelError, match="beyond the 1024 MiB"):
        check_tensor_sizes(bomb_model("ConstantOfShape"), 1 << 30)


def test_cli_one_line_for_a_model_bomb(tmp_path, folder):
    m = save(bomb_model("ConstantOfShape"), tmp_path / "bomb.onnx")
    code, _, err = run_main(["explain", m, folder / "good.png", "--out", tmp_path / "out",
                             "--method", "gradient", "--device", "cpu"])
    assert code == 2
    assert "ConstantOfShape" in one_error_line(err) and "[32768, 32768]" in err


def test_the_probe_run_of_the_pass_does_not_run_a_bomb(monkeypatch):
    """The pass's probe (a run to learn unknown ranks) checks sizes first."""
    import onnxruntime as ort

    from onnxsal.autodiff.prepare import probe_ranks

    def no_session(*a, **k):
        raise AssertionError("a session was created")

    monkeypatch.setattr(ort, "InferenceSession", no_session)
    with pytest.raises(ModelError, match="Expand"):
        probe_ranks(bomb_model("Expand"), ["big"], {})


def test_a_huge_sparse_tensor_is_refused_not_densified(tmp_path):
    from onnxsal.model import load_model

    m = tiny()
    values = numpy_helper.from_array(np.ones(1, np.float32), "S")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "S_i")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1 << 20, 1 << 20]))
    with pytest.raises(ModelError, match="sparse tensor 'S' is .* MiB dense .*: refused"):
        load_model(save(m, tmp_path / "m.onnx"))


@pytest.mark.parametrize("key", ["onnxsal.preprocess", "onnxsal.labels"])
def test_deeply_nested_json_metadata_is_refused_or_ignored(key):
    """JSON nested 100000 deep in the metadata (a recursion bomb for json.loads): the
    preprocessing is a one-line OptionError, labels are ignored."""
    from onnxsal.engine import Engine
    from onnxsal.errors import OptionError

    m = tiny()
    helper.set_model_props(m, {key: "[" * 100000 + "]" * 100000})
    if key == "onnxsal.preprocess":
        with pytest.raises(OptionError, match="nested too deeply"):
            Engine(m, device="cpu", use_disk_cache=False)
    else:
        assert Engine(m, device="cpu", use_disk_cache=False).labels is None
