"""onnxsal/files.py: the one atomic writer behind results, models and cache entries."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsal import cache, files
from onnxsal.errors import OutputError
from onnxsal.model import save_model


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tiny() -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_the_umask_of_the_moment_decides_the_mode(tmp_path, umask027):
    """The mode follows the umask when the file is written, not when onnxsal was imported,
    and writing leaves the umask as it was."""
    files.atomic_write_json(tmp_path / "r.json", {"a": np.float32(1.5)})
    assert _mode(tmp_path / "r.json") == 0o640
    assert os.umask(0o027) == 0o027
    save_model(_tiny(), str(tmp_path / "m.onnx"))
    assert _mode(tmp_path / "m.onnx") == 0o640
    assert onnx.load(tmp_path / "m.onnx").graph.initializer[0].float_data == [1.0, 2.0]


def test_cache_entries_are_private(tmp_path):
    folder = tmp_path / "cache"
    cache.store(folder, "k" * 64, _tiny())
    (entry,) = folder.iterdir()
    assert _mode(entry) == 0o600 and cache.load(folder, "k" * 64) is not None


def test_a_full_disk_is_an_output_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    files.atomic_write_text(path, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device"):
        files.atomic_write_bytes(path, b"new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_a_callback_writer_and_savez_round_trip(tmp_path):
    files.atomic_write(tmp_path / "a.npy", lambda f: np.save(f, np.arange(3)))
    files.atomic_savez(tmp_path / "b.npz", x=np.ones(2))
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    assert np.load(tmp_path / "b.npz")["x"].tolist() == [1.0, 1.0]
