"""``.npz`` files as lazy sources: the array ``x`` is read a slice at a time.

numpy's load with ``mmap_mode="r"`` does not memory-map the members of an ``.npz`` (it reads a
member whole when it is accessed), so :class:`_Member` reads ``x.npy`` itself: in an
uncompressed ``.npz`` (``np.savez``) the member's bytes lie contiguously in the file and are
memory-mapped; in a compressed one (``np.savez_compressed``) a slice is read by decompressing
the member's stream up to the slice's end (the cost of reading a slice grows with its position;
the memory does not). A Fortran-ordered ``x`` is read whole, once. ``y``, ``names`` and
``class_names`` are small and read whole.

Checks that need the whole of ``x`` (integer or float range) run over it in chunks when the
source is opened, so a bad file is refused before any work, in one line, as before.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError
from .pixels import ImageFailure, _to_float_hwc
from .sources import DataSource

CHUNK_BYTES = 64 << 20


class _Member:
    """One ``.npy`` member of a zip file, read by rows (axis 0) without reading the rest."""

    def __init__(self, path: Path, name: str) -> None:
        # set first: close() (and so __del__) must work even when reading the header fails
        self._open: tuple[zipfile.ZipFile, Any] | None = None
        self.path, self.name = path, name
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(name)
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                self.header = f.tell()
            self.stored = info.compress_type == zipfile.ZIP_STORED
            self.offset = None
            if self.stored:  # where the member's data starts in the file: after its local header
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset + 26)
                    n, m = np.frombuffer(raw.read(4), "<u2")
                    self.offset = info.header_offset + 30 + int(n) + int(m) + self.header
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        self.shape, self.fortran, self.dtype = tuple(shape), bool(fortran), dtype
        self._whole: np.ndarray | None = None
        # self._open holds a compressed member kept open: a zip stream seeks forward by
        # decompressing only the gap, so reading slices in order costs one pass, not one per slice

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}  # a worker opens its own

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open[0].close()
            self._open = None

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def rows(self, start: int, stop: int) -> np.ndarray:
        if not self.shape:
            raise ValueError("a 0-d array has no rows")
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.fortran or row == 0:
            if self._whole is None:
                with np.load(self.path, allow_pickle=False) as z:
                    self._whole = z[self.name[:-4]]
            return self._whole[start:stop]
        if self.stored:
            mm = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape)
            return np.array(mm[start:stop])
        if self._open is None:
            zf = zipfile.ZipFile(self.path)
            self._open = (zf, zf.open(self.name))
        f = self._open[1]
        f.seek(self.header + start * row)  # forward from where the last read ended: the gap only
        buf = f.read((stop - start) * row)
        return np.frombuffer(buf, self.dtype).reshape((stop - start,) + self.shape[1:])

    def chunks(self) -> Iterator[np.ndarray]:
        row = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
        step = max(1, CHUNK_BYTES // row)
        for s in range(0, len(self), step):
            yield self.rows(s, min(len(self), s + step))


def _layout(shape: tuple, where: str) -> str:
    """How to bring rows of ``x`` to N,H,W,C: "add" a channel axis, "keep", or "move" it."""
    if len(shape) == 3:
        return "add"
    if len(shape) != 4:
        raise InputError(f"{where}: 'x' must be N,H,W or N,H,W,C or N,C,H,W; got shape {shape}")
    if shape[3] in (1, 2, 3, 4):
        return "keep"
    if shape[1] in (1, 2, 3, 4):
        return "move"
    raise InputError(f"{where}: cannot tell the channel axis of 'x' with shape {shape} "
                     "(1 to 4 channels, first or last)")


def _scaling(x: _Member, where: str) -> float | None:
    """The divisor that brings integer ``x`` to [0, 1] (None for bool and float ``x``),
    after checking the whole array's range in chunks."""
    dt = x.dtype
    if dt == np.bool_:
        return None
    if np.issubdtype(dt, np.integer):
        lo, hi = 0, 0
        for k, c in enumerate(c for c in x.chunks() if c.size):  # one pass over the data
            lo, hi = (int(c.min()), int(c.max())) if k == 0 else (min(lo, int(c.min())), max(hi, int(c.max())))
        if lo < 0:
            raise InputError(f"{where}: 'x' holds negative integer pixel values")
        if hi <= 255:
            return 255.0
        if dt == np.uint16:
            return 65535.0
        raise InputError(f"{where}: integer 'x' must hold 0..255 (found up to {hi})")
    if np.issubdtype(dt, np.floating):
        lo, hi = np.inf, -np.inf
        for c in x.chunks():
            fin = c[np.isfinite(c)]
            if fin.size:
                lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(f"{where}: float 'x' must lie in [0, 1], found {lo:.4g}.."
                             f"{hi:.4g} (store uint8 0..255, or divide by 255)")
        return None
    raise InputError(f"{where}: unsupported pixel type {dt} for 'x'")


def _labels(y: np.ndarray, n: int, where: str, notes: list[str]) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[0] == n:
        y = y.argmax(axis=1)
        notes.append("labels 'y' given one-hot: taken as the argmax")
    if y.ndim != 1 or len(y) != n:
        raise InputError(f"{where}: 'y' has shape {y.shape}, expected ({n},) to match 'x'")
    if not (np.issubdtype(y.dtype, np.integer) or
            (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise InputError(f"{where}: 'y' must hold integer class indices, got {y.dtype}")
    if n and y.min() < 0:
        raise InputError(f"{where}: 'y' holds negative class indices")
    return y.astype(np.int64)


def _open(path: Path) -> tuple[_Member, dict]:
    """``x`` as a lazy member, and the small arrays (y, names, class_names) read whole."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "x" not in keys:
                raise InputError(f"{path}: no array 'x' (found: {', '.join(sorted(keys)) or 'none'})")
            small = {k: z[k] for k in ("y", "names", "class_names") if k in keys}
        return _Member(path, "x.npy"), small
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"{path}: cannot read without unpickling ({exc}); store plain "
                         "numeric arrays") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


class NpzSource(DataSource):
    """The images of an ``.npz`` file (``x``: N,H,W / N,H,W,C / N,C,H,W, uint8 0..255,
    uint16, bool or float in [0, 1]; optional ``y``, ``names``, ``class_names``)."""

    def __init__(self, path: Path, index: Sequence[int] | None = None, _meta: dict | None = None) -> None:
        self.path = Path(path)
        if _meta is None:
            _meta = self._read_meta()
        self.meta = _meta
        n = len(_meta["names"])
        self.index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        labels = _meta["labels"]
        self.labels = None if labels is None else labels[self.index]
        self.names = [_meta["names"][i] for i in self.index]
        self.class_names, self.notes = _meta["class_names"], list(_meta["notes"])
        self.source = f"npz {self.path}"

    def _read_meta(self) -> dict:
        where = str(self.path)
        x, small = _open(self.path)
        layout = _layout(x.shape, where)
        n = len(x)
        if n == 0:
            raise InputError(f"{where}: 'x' holds no images (shape {x.shape})")
        scale = _scaling(x, where)
        notes: list[str] = []
        labels = _labels(small["y"], n, where, notes) if "y" in small else None
        names = small.get("names")
        names = [str(s) for s in names] if names is not None and len(names) == n else \
            [f"x[{i}]" for i in range(n)]
        classes = small.get("class_names")
        return {"x": x, "layout": layout, "scale": scale, "labels": labels, "names": names,
                "class_names": [str(c) for c in classes] if classes is not None else None,
                "notes": notes}

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows of ``x`` (file order) as N,H,W,C, scaled as the whole file is."""
        m = self.meta
        x = m["x"].rows(start, stop)
        x = x[..., None] if m["layout"] == "add" else x.transpose(0, 2, 3, 1) \
            if m["layout"] == "move" else x
        if x.dtype == np.bool_:
            return x.astype(np.float32)
        if m["scale"] is not None:
            return x.astype(np.float32) / np.float32(m["scale"])
        return x

    def load_many(self, index: Sequence[int]):
        index = [int(i) for i in index]
        rows = self.index[index] if index else np.zeros(0, np.int64)
        k = 0
        while k < len(index):  # runs of consecutive rows are read together
            e = k + 1
            while e < len(index) and rows[e] == rows[e - 1] + 1:
                e += 1
            block = self._rows(int(rows[k]), int(rows[e - 1]) + 1)
            for j in range(k, e):
                try:
                    yield index[j], _to_float_hwc(block[j - k], self.names[index[j]])
                except InputError as exc:
                    yield index[j], str(exc).split(": ", 1)[-1]
            k = e

    def load(self, i: int) -> np.ndarray:
        _, got = next(iter(self.load_many([i])))
        if isinstance(got, str):
            raise ImageFailure(got)
        return got

    def take(self, index: Sequence[int]) -> "NpzSource":
        return NpzSource(self.path, self.index[np.asarray(index, np.int64)], self.meta)

    def check_reachable(self) -> None:
        if not self.path.is_file():
            import socket

            raise InputError(f"the data file {self.path} is not reachable on host "
                             f"{socket.gethostname()} (run with --data-from-driver)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        meta = dict(state["meta"])  # the names of the other rows stay behind
        meta["names"] = {int(i): meta["names"][i] for i in self.index}
        state["meta"] = meta
        return state
