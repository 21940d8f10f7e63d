"""Atomic file writes: the one way onnxsal writes a result, a model or a cache entry.

A file is filled under a temporary name in its own folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file and the old one stays
whole until the new one is. The temporary file is created with the final mode (subject to the
process umask, which is never changed), so nothing has to read or reset the umask.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .display import printable
from .errors import OutputError, first_line

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _temporary(path: Path, mode: int) -> tuple[int, Path]:
    """A new file beside ``path`` (short name: the final one may be near the 255-byte limit)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name[:64]}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _CREATE, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {printable(path)}: {exc.strerror or first_line(exc)}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], mode: int = 0o666) -> None:
    """Fill ``path`` through ``write(file)`` on a temporary file in the same folder, then
    ``os.replace``. A file system that refuses (a full disk, a read-only folder) is one
    :class:`OutputError` and no temporary file. ``mode`` is masked by the umask (0o600 for
    private files)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary(path, mode)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _output_error(path, exc) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8; bytes of a non-UTF-8 file name it quotes are written as
    ``\\xff`` escapes (see :func:`onnxsal.display.printable`)."""
    atomic_write_bytes(path, printable(text, keep_newlines=True).encode("utf-8"))


def _json_default(o: Any):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    """Stable JSON (sorted keys are not used: insertion order is the documented order)."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (ASCII: other characters, also undecodable bytes, are escaped)."""
    atomic_write_bytes(path, to_json(obj).encode("ascii"))


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary file (no pickled objects: plain arrays only)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_savez", "to_json"]
