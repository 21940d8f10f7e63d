"""Streaming: a data set brought to a model's input shape batch by batch, never whole.

:func:`stream_dataset` opens a source and makes one pass over it (decoding, conforming and
hashing a batch at a time, then dropping the pixels) to learn what a :class:`Dataset` would
say: which images are usable, their names and labels, the conversion notes, the failures and
the fingerprint (the same SHA-256 as :meth:`Dataset.fingerprint` of the eager load). The
result, a :class:`StreamedDataset`, holds no pixels: :meth:`StreamedDataset.read` reads any
slice again, and :meth:`StreamedDataset.reader` gives a small picklable
:class:`SliceReader` that a shard or a remote worker reads its own slice with. Each image's
digest is kept, so a slice read again (later, or on another machine) is checked to hold the
very pixels the pass saw.

Memory: one batch of decoded images, plus per image its name, label and 8-byte digest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from .conform import Conformer, channels_as_read, conform, want_shape
from .sources import DataSource, MemorySource
from .types import Dataset, RawImages

BATCH = 64


class _Restart(Exception):
    """The pass assumed a channel count or image count that proved wrong: run it again."""

    def __init__(self, c: int | None = None, n: int | None = None) -> None:
        self.c, self.n = c, n


def _digest(chw: np.ndarray) -> bytes:
    return hashlib.blake2b(chw.tobytes(), digest_size=8).digest()


@dataclass
class SliceReader:
    """The images of one slice of a :class:`StreamedDataset`: its items' source and the
    conversion, picklable and small. :meth:`read` decodes and conforms them."""

    items: DataSource
    c: int
    hw: tuple[int, int]
    digests: bytes
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.items)

    def read(self) -> Dataset:
        conf = Conformer(self.c, self.hw)
        out = []
        for i, got in self.items.load_many(range(len(self.items))):
            name = self.items.names[i]
            if isinstance(got, str):
                if i == 0:
                    self.items.check_reachable()
                raise InputError(f"{name}: read before, now it fails ({got}): the data changed "
                                 "during the run")
            chw = conf(got)
            if _digest(chw) != self.digests[8 * i:8 * i + 8]:
                raise InputError(f"{name}: its pixels differ from what the first pass read "
                                 "(the data changed, or this machine decodes it differently)")
            out.append(chw)
        images = np.stack(out) if out else np.zeros((0, self.c) + self.hw, np.float32)
        return Dataset(images, self.labels, list(self.items.names), self.source, self.class_names)


class StreamedDataset:
    """What :class:`Dataset` says about a data set (names, labels, notes, failures, shape,
    fingerprint, :meth:`describe`), without its pixels: :meth:`read` a slice when needed."""

    def __init__(self, items: DataSource, c: int, hw: tuple[int, int], digests: bytes,
                 notes: list[str], failures: list[tuple[str, str]], fingerprint: str) -> None:
        self.items = items  # the usable items, in order
        self.c, self.hw = c, hw
        self._digests = digests
        self.names = list(items.names)
        self.labels = items.labels
        self.source = items.source
        self.class_names = items.class_names
        self.notes = notes
        self.failures = failures
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.c,) + tuple(self.hw)  # type: ignore[return-value]

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        """The same JSON-ready description as :meth:`Dataset.describe` (no pixels)."""
        return {"source": self.source, "count": len(self), "shape": list(self.shape),
                "labels": self.labels is not None, "class_names": self.class_names,
                "fingerprint": self._fingerprint, "notes": list(self.notes),
                "failures": [{"name": n, "error": e} for n, e in self.failures]}

    def reader(self, index: slice) -> SliceReader:
        """A reader of the images ``index`` (a slice of the usable images)."""
        start, stop, _ = index.indices(len(self))
        rows = list(range(start, stop))
        return SliceReader(self.items.take(rows), self.c, self.hw,
                           self._digests[8 * start:8 * stop],
                           None if self.labels is None else self.labels[start:stop],
                           self.class_names, self.source)

    def read(self, index: slice = slice(None)) -> Dataset:
        """The images ``index`` as a :class:`Dataset` (decoded now)."""
        ds = self.reader(index).read()
        ds.notes, ds.failures = list(self.notes), list(self.failures)
        return ds

    def batches(self, size: int = BATCH) -> Iterator[Dataset]:
        """The whole data set, one :class:`Dataset` of at most ``size`` images at a time."""
        for s in range(0, len(self), size):
            yield self.read(slice(s, min(len(self), s + size)))


def _bar(total: int, desc: str, on: bool) -> Any:
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, leave=False)


def _pass(src: DataSource, want: tuple, limit: int | None, n_assumed: int, batch: int,
          progress: bool) -> tuple:
    """One pass over ``src``: (usable items, channels, size, digests, notes, failures,
    fingerprint); :class:`_Restart` when an assumption proved wrong."""
    c, h, w = want
    conf = None
    kept: list[int] = []
    failures: list[tuple[str, str]] = []
    digests = bytearray()
    hasher = None
    sizes: set = set()
    bar = _bar(n_assumed, "reading data", progress)
    try:
        for start in range(0, len(src), batch):
            for i, got in src.load_many(range(start, min(len(src), start + batch))):
                if limit is not None and len(kept) >= limit:
                    break
                if isinstance(got, str):
                    failures.append((src.names[i], got))
                    continue
                seen = channels_as_read(got.shape[2])
                if c is None:
                    c = seen
                elif seen == 3 and c == 1 and want[0] is None:
                    raise _Restart(c=3)
                sizes.add(got.shape[:2])
                if (h is None or w is None) and len(sizes) > 1:
                    raise InputError(f"{src.source}: the images have different sizes "
                                     f"({', '.join(f'{a}x{b}' for a, b in sorted(sizes)[:4])}, ...) "
                                     "and the model's input size is dynamic: give a fixed input size")
                if conf is None:
                    conf = Conformer(c, (h if h is not None else got.shape[0],
                                         w if w is not None else got.shape[1]))
                    hasher = hashlib.sha256(repr((n_assumed, conf.c) + conf.hw).encode())
                chw = conf(got)
                hasher.update(chw.tobytes())
                digests += _digest(chw)
                kept.append(i)
                if bar is not None:
                    bar.update(1)
            if limit is not None and len(kept) >= limit:
                break
    finally:
        if bar is not None:
            bar.close()
    return kept, conf, bytes(digests), failures, hasher


def stream_dataset(data: Any, shape: Sequence[int | None] | None = None, limit: int | None = None,
                   split: str | None = None, *, batch: int = BATCH,
                   progress: bool = False) -> StreamedDataset:
    """``data`` (anything :func:`onnxsal.data.load_dataset` reads, or a :class:`DataSource`)
    brought to ``shape`` = (C, H, W) lazily: one streaming pass now, the pixels read again
    slice by slice later (:meth:`StreamedDataset.read`, :meth:`StreamedDataset.batches`,
    :meth:`StreamedDataset.reader`). Same names, labels, notes, failures and fingerprint as
    ``load_dataset(data, shape, limit, split)``; ``progress`` shows a bar (images per second,
    time left)."""
    from .loading import check_limit, open_source

    check_limit(limit)
    if isinstance(data, Dataset):
        data = RawImages([im.transpose(1, 2, 0) for im in data.images], data.labels,
                         list(data.names), data.source, data.class_names, list(data.notes),
                         list(data.failures))
    src = MemorySource(data) if isinstance(data, RawImages) else \
        data if isinstance(data, DataSource) else open_source(data, split, limit)
    c, h, w = want_shape(shape)
    if c is not None and c not in (1, 3):
        raise InputError(f"cannot convert images to {c} channels (only 1 or 3)")
    n_assumed = len(src) if limit is None else min(limit, len(src))
    for _ in range(3):  # at most: the channel count, then the image count, proved wrong
        try:
            kept, conf, digests, failures, hasher = _pass(src, (c, h, w), limit, n_assumed,
                                                          batch, progress)
        except _Restart as again:
            c = again.c
            continue
        if not kept:
            raise InputError(f"{src.source}: no usable image"
                             + (f" ({len(failures)} failed: {failures[0][0]}: {failures[0][1]})"
                                if failures else ""))
        if len(kept) == n_assumed:
            break
        n_assumed = len(kept)
    else:  # pragma: no cover - each restart fixes one assumption for good
        raise InputError(f"{src.source}: the data changed while it was read")
    items = src.take(kept)
    if items.labels is not None:
        hasher.update(np.ascontiguousarray(items.labels, dtype=np.int64).tobytes())
    hasher.update("\n".join(items.names).encode("utf-8", "surrogateescape"))
    notes = list(src.notes) + conf.notes()
    failures = list(getattr(src, "failures_before", [])) + failures
    return StreamedDataset(items, conf.c, conf.hw, digests, notes, failures, hasher.hexdigest())


def per_shape(data: Any, limit: int | None, split: str | None,
               progress: bool = False) -> Callable[[Any], Any]:
    """``data_for(engine)``: the data conformed to each engine's ``input_shape`` (read once
    per shape): in memory when ``data`` is a Dataset or RawImages, else streamed (a
    :class:`StreamedDataset`, one streaming pass per shape)."""
    if isinstance(data, Dataset):
        base: Dataset | RawImages = data if limit is None else data.subset(slice(0, limit))
    elif isinstance(data, RawImages):
        base = data
    else:
        from .loading import open_source

        src = open_source(data, split, limit)
        streamed: dict[tuple, Any] = {}

        def stream_for(eng) -> Any:
            shape = tuple(eng.input_shape)
            if shape not in streamed:
                streamed[shape] = stream_dataset(src, shape, limit, progress=progress)
            return streamed[shape]

        return stream_for
    conformed: dict[tuple, Dataset] = {}

    def data_for(eng) -> Dataset:
        shape = tuple(eng.input_shape)
        if shape not in conformed:
            if isinstance(base, Dataset) and base.shape == shape:
                conformed[shape] = base
            else:
                raw = base
                if isinstance(base, Dataset):
                    raw = RawImages([im.transpose(1, 2, 0) for im in base.images], base.labels,
                                    list(base.names), base.source, base.class_names,
                                    list(base.notes), list(base.failures))
                conformed[shape] = conform(raw, shape)
        return conformed[shape]

    return data_for


def reads_on_workers(value: bool | None, executor: Any) -> bool:
    """Whether remote workers read their slice from the data's path themselves: ``value``
    when given, else the executor's ``data_on_workers`` (``--data-on-workers`` /
    ``--data-from-driver``), else ``$ONNXSAL_DATA_ON_WORKERS`` (1/0), else yes exactly when the
    workers share this machine's files (a Ray instance started by this run)."""
    if value is None:
        value = getattr(executor, "data_on_workers", None)
    if value is not None:
        return bool(value)
    env = os.environ.get("ONNXSAL_DATA_ON_WORKERS", "").strip()
    if env:
        return env not in ("0", "false", "no")
    return bool(getattr(executor, "shares_files", True))
