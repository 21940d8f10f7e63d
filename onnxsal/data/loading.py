"""The eager entry points: :func:`load_raw` (read everything now) and :func:`load_dataset`
(read and conform), both on top of the lazy sources of :func:`open_source`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from .builtins import BUILTINS, digits_source, fashion_mnist_source, skimage_source
from .conform import conform
from .npz import NpzSource
from .sources import DataSource, FileSource, files_source, folder_source, list_source
from .types import Dataset, RawImages

LIST_SUFFIXES = {".csv", ".txt"}


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise InputError(f"--limit must be a positive integer, got {limit!r}")


def open_source(data: "str | os.PathLike | Sequence[str | os.PathLike]", split: str | None = None,
                limit: int | None = None) -> DataSource:
    """The lazy source of ``data`` (see :func:`load_dataset` for what ``data`` is); nothing
    is decoded yet. ``limit`` only trims the list of scikit-image samples (the others read
    their first images lazily anyway)."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (list, tuple)):
        return files_source([Path(p) for p in data])
    text = os.fspath(data)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            return folder_source(path)
        if path.suffix.lower() == ".npz":
            return NpzSource(path)
        if path.suffix.lower() in LIST_SUFFIXES:
            return list_source(path)
        return FileSource([path], None, None, f"file {path}")
    name, _, sub = text.partition(":")
    sub = sub or split
    if name == "fashion-mnist":
        return fashion_mnist_source(split=sub or "test")
    if name == "digits":
        if sub:
            raise InputError(f"the digits data set has no splits (got '{sub}')")
        return digits_source()
    if name == "skimage-samples":
        if sub:
            raise InputError(f"skimage-samples has no splits (got '{sub}')")
        return skimage_source(limit)
    raise InputError(f"data '{text}': no such file or folder, and not a built-in data set "
                     f"(built-ins: {', '.join(BUILTINS)})")


def load_raw(data: "str | os.PathLike | Sequence[str | os.PathLike]", limit: int | None = None,
             split: str | None = None) -> RawImages:
    """Read images without converting them (see :func:`load_dataset` for what ``data`` is)."""
    check_limit(limit)
    return open_source(data, split, limit).raw(limit)


def load_dataset(data: "str | os.PathLike | Sequence[str | os.PathLike] | RawImages | Dataset",
                 shape: Sequence[int | None] | None = None, limit: int | None = None,
                 split: str | None = None) -> Dataset:
    """Load ``data`` and bring it to ``shape`` = (C, H, W) (entries may be None: keep as read).

    ``data`` is a folder (one subfolder per class, or a flat folder without labels), an image
    file, a list of image files, a CSV file of ``path,label`` rows or a ``.txt`` list of
    paths, an ``.npz`` file with ``x`` and optional ``y``, or a built-in name:
    ``fashion-mnist`` (``fashion-mnist:train`` for the training split), ``digits``,
    ``skimage-samples``. Everything is read into memory; :func:`onnxsal.data.stream_dataset`
    reads the same data batch by batch instead.
    """
    if isinstance(data, Dataset):
        raw = RawImages([im.transpose(1, 2, 0) for im in data.images], data.labels,
                        list(data.names), data.source, data.class_names, list(data.notes),
                        list(data.failures))
        if limit is not None:
            raw = _limit(raw, limit)
    elif isinstance(data, RawImages):
        raw = _limit(data, limit) if limit is not None else data
    else:
        raw = load_raw(data, limit=limit, split=split)
    return conform(raw, shape)


def _limit(raw: RawImages, limit: int | None) -> RawImages:
    if limit is None:
        return raw
    return RawImages(raw.images[:limit], None if raw.labels is None else raw.labels[:limit],
                     raw.names[:limit], raw.source, raw.class_names, list(raw.notes),
                     list(raw.failures))


def iter_batches(n: int, size: int) -> Iterable[slice]:
    """Slices covering range(n) in steps of ``size``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))
