"""The augmented-model cache: keyed by the code fingerprint, every entry checked when read.

A tampered entry (still valid ONNX), a symbolic link in place of an entry and a folder others
can write to are never used: the engine rebuilds, and its gradients match torch autograd.
"""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxsal import cache
from onnxsal.engine import Engine

from conftest import export_torch, torch_jacobian

torch = pytest.importorskip("torch")
nn = torch.nn
SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 8 * 8, 5)).eval()
    return m, export_torch(m, torch.randn(2, *SHAPE))


def _x():
    return np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)


def _assert_true_gradients(module, eng):
    x = _x()
    _, ref = torch_jacobian(module, x)
    _, g = eng.gradient(x, targets=[1, 3])
    want = ref[[1, 3], [0, 1]]
    np.testing.assert_allclose(g, want, atol=1e-5 * np.abs(want).max())


def _entries(folder):
    return sorted(p for p in folder.iterdir() if p.name.endswith(".onnx"))


def _tampered(path) -> onnx.ModelProto:
    """The entry with its largest float initializer scaled by 3: still a valid ONNX model."""
    m = onnx.load(str(path))
    t = max(m.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3, t.name))
    onnx.checker.check_model(m)
    return m


def test_entry_is_named_by_its_content_hash(cnn, tmp_path):
    module, model = cnn
    folder = tmp_path / "new" / "cache"
    Engine(model, device="cpu", cache_dir=folder).gradient(_x())
    (entry,) = _entries(folder)
    key, digest, _ = entry.name.split(".")
    assert digest == hashlib.sha256(entry.read_bytes()).hexdigest()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    # a second engine reads the entry (it is not rewritten) and gives the same gradients
    before = entry.stat().st_mtime_ns
    _assert_true_gradients(module, Engine(model, device="cpu", cache_dir=folder))
    assert _entries(folder) == [entry] and entry.stat().st_mtime_ns == before


def test_tampered_entry_is_rebuilt(cnn, tmp_path):
    module, model = cnn
    Engine(model, device="cpu", cache_dir=tmp_path).gradient(_x())
    (entry,) = _entries(tmp_path)
    onnx.save(_tampered(entry), str(entry))  # edited in place: same name, other bytes
    eng = Engine(model, device="cpu", cache_dir=tmp_path)
    _assert_true_gradients(module, eng)
    (fresh,) = _entries(tmp_path)
    assert fresh.name == entry.name  # rebuilt and written again under the true hash
    assert hashlib.sha256(fresh.read_bytes()).hexdigest() == fresh.name.split(".")[1]


def test_unreadable_entry_is_rebuilt(cnn, tmp_path):
    module, model = cnn
    Engine(model, device="cpu", cache_dir=tmp_path).gradient(_x())
    (entry,) = _entries(tmp_path)
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])  # truncated
    _assert_true_gradients(module, Engine(model, device="cpu", cache_dir=tmp_path))
    assert [p.read_bytes() for p in _entries(tmp_path)] == [data]


def test_symlinked_entry_is_not_followed(cnn, tmp_path):
    """A link named by the hash of what it points to (a tampered graph) is removed, unread."""
    module, model = cnn
    folder = tmp_path / "cache"
    Engine(model, device="cpu", cache_dir=folder).gradient(_x())
    (entry,) = _entries(folder)
    key = entry.name.split(".")[0]
    forged = _tampered(entry).SerializeToString()
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(forged)
    entry.unlink()
    link = folder / f"{key}.{hashlib.sha256(forged).hexdigest()}.onnx"
    link.symlink_to(target)
    assert cache.load(folder, key) is None
    assert not link.is_symlink() and target.read_bytes() == forged
    # and through the engine: the same link again, and the true gradients
    link.symlink_to(target)
    _assert_true_gradients(module, Engine(model, device="cpu", cache_dir=folder))
    assert not link.is_symlink() and target.read_bytes() == forged
    assert all(not p.is_symlink() for p in _entries(folder))


def test_code_fingerprint_is_in_the_key(cnn, tmp_path, monkeypatch):
    module, model = cnn
    Engine(model, device="cpu", cache_dir=tmp_path).gradient(_x())
    Engine(model, device="cpu", cache_dir=tmp_path).gradient(_x())
    (old,) = _entries(tmp_path)
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "a fixed rule")
    eng = Engine(model, device="cpu", cache_dir=tmp_path)
    _assert_true_gradients(module, eng)
    entries = _entries(tmp_path)
    assert len(entries) == 2 and old in entries
    assert len({p.name.split(".")[0] for p in entries}) == 2


def test_folder_others_can_write_is_made_private_and_emptied(cnn, tmp_path):
    """A folder of this user's that others could write to (umask 002, or chmod 777): entries
    planted there are dropped, unread, and the folder becomes 0700 before it is used."""
    module, model = cnn
    Engine(model, device="cpu", cache_dir=tmp_path / "own").gradient(_x())
    (entry,) = _entries(tmp_path / "own")
    forged = _tampered(entry).SerializeToString()
    key = entry.name.split(".")[0]
    folder = tmp_path / "shared"
    folder.mkdir()
    planted = folder / f"{key}.{hashlib.sha256(forged).hexdigest()}.onnx"
    planted.write_bytes(forged)
    (folder / "notes.txt").write_text("not an entry")
    folder.chmod(0o777)
    _assert_true_gradients(module, Engine(model, device="cpu", cache_dir=folder))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert not planted.exists() and (folder / "notes.txt").exists()
    assert len(_entries(folder)) == 1  # the rebuilt entry, written under the true hash
