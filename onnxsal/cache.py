"""The on-disk cache of augmented (gradient) models.

An entry is ``<key>.<sha256 of its bytes>.onnx``. The key hashes everything the augmented graph
depends on: the caller's parts (the model's content hash and options), onnxsal's code
fingerprint (:func:`onnxsal.code_fingerprint`, so that a fixed rule never serves an old graph)
and the onnx and onnxruntime versions (shape inference, the inliner and the simplifier shape
the graph too). Every read re-hashes the bytes: an entry whose bytes do not match its name, that
is a symbolic link or not a regular file, or that does not parse as a self-contained ONNX model
is deleted and rebuilt, never used.

The folder is created with mode 0700 and used only when it belongs to the user; when others
could write to it, it is made private and its entries are dropped first. The content hash
catches corrupted and edited entries; it cannot stop someone who may write to the folder and
names a forged entry by its own hash: keeping such people out is the folder permissions' job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import onnx

from . import code_fingerprint
from .errors import OutputError
from .files import atomic_write_bytes

MAX_ENTRY_BYTES = 1 << 30  # one protobuf file; larger models are rebuilt each time
ENTRY = re.compile(r"[0-9a-f]{64}\.[0-9a-f]{64}\.onnx")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, ``$ONNXSAL_CACHE``, or the user cache folder."""
    if override:
        return Path(override)
    env = os.environ.get("ONNXSAL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxsal"


def entry_key(*parts) -> str:
    """The key of an entry built from ``parts`` (JSON values) by this code and these libraries."""
    import onnxruntime

    src = json.dumps([list(parts), code_fingerprint(), onnx.__version__, onnxruntime.__version__],
                     sort_keys=True)
    return hashlib.sha256(src.encode()).hexdigest()


def _private(folder: Path) -> bool:
    """Whether ``folder`` is a directory of this user that nobody else can write to. One of
    this user's that others could write to (an older onnxsal's, under umask 002) is made so,
    and its entries, which anyone could have planted, are dropped."""
    try:
        st = os.stat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        return False
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.chmod(folder, 0o700)
            for path in folder.iterdir():
                if ENTRY.fullmatch(path.name):
                    path.unlink()
        except OSError:
            return False
    return True


def _read(path: Path, digest: str) -> onnx.ModelProto | None:
    """The entry's model, or None when it is a link, not a regular file, not the bytes its
    name promises, not ONNX, or keeps data outside itself."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode) or path.is_symlink():
            return None
        data = f.read(MAX_ENTRY_BYTES + 1)
    if len(data) > MAX_ENTRY_BYTES or hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        model = onnx.load_from_string(data)
    except Exception:
        return None
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        return None
    return model


def load(folder: Path, key: str) -> onnx.ModelProto | None:
    """The cached model of ``key``, or None; bad entries of the key are deleted."""
    if not _private(folder):
        return None
    for path in sorted(folder.glob(f"{key}.*.onnx")):
        model = _read(path, path.name[len(key) + 1:-len(".onnx")])
        if model is not None:
            return model
        try:
            path.unlink()  # a link is removed, not what it points to
        except OSError:
            pass
    return None


def store(folder: Path, key: str, model: onnx.ModelProto) -> None:
    """Write the entry of ``key`` atomically (a read-only or shared folder only costs time)."""
    if model.ByteSize() > MAX_ENTRY_BYTES:
        return
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return
    if not _private(folder):
        return
    data = model.SerializeToString()
    try:
        atomic_write_bytes(folder / f"{key}.{hashlib.sha256(data).hexdigest()}.onnx", data, mode=0o600)
    except OutputError:
        pass


__all__ = ["cache_dir", "entry_key", "load", "store"]
