"""The audited images, read in batches and by index, never all at once when onnxsal.data can
stream: :func:`onnxsal.data.stream_dataset` makes one pass (names, labels, fingerprint) and
each section reads only the images it uses. Without streaming support (or for a
:class:`~onnxsal.data.Dataset` given in memory) the images are loaded once."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


class AuditImages:
    """Names, labels, class names, shape, fingerprint and description of the data set, and
    its images by batch (:meth:`batches`) and by index (:meth:`take`, :meth:`subset`)."""

    def __init__(self, data: Any, shape: tuple[int, ...], limit: int | None = None) -> None:
        from .. import data as d

        self.streamed = False
        if isinstance(data, d.Dataset) and limit is None and data.shape == tuple(shape):
            self._ds: Any = data
        elif not isinstance(data, d.Dataset):
            self._ds = d.stream_dataset(data, shape=tuple(shape), limit=limit)
            self.streamed = True
        else:
            self._ds = d.load_dataset(data, shape=tuple(shape), limit=limit)
        ds = self._ds
        self.names: list[str] = list(ds.names)
        self.labels = None if ds.labels is None else np.asarray(ds.labels, np.int64)
        self.class_names = ds.class_names
        self.source = ds.source
        self.shape = tuple(ds.shape)

    def __len__(self) -> int:
        return len(self.names)

    def fingerprint(self) -> str:
        return self._ds.fingerprint()

    def describe(self) -> dict:
        return self._ds.describe()

    def batches(self, size: int = 256) -> Iterator[np.ndarray]:
        """Every image in order, ``size`` at a time (float32 [n, C, H, W])."""
        for s in range(0, len(self), size):
            yield self._read(s, min(len(self), s + size))

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.streamed:
            return np.asarray(self._ds.read(slice(start, stop)).images, np.float32)
        return self._ds.images[start:stop]

    def take(self, index: np.ndarray) -> np.ndarray:
        """The images at ``index`` (in that order), read in runs of consecutive indices."""
        idx = np.asarray(index, np.int64).reshape(-1)
        if not self.streamed:
            return self._ds.images[idx]
        out = np.zeros((len(idx),) + self.shape, np.float32)
        order = np.argsort(idx, kind="stable")
        run_start = 0
        for j in range(1, len(order) + 1):
            if j == len(order) or idx[order[j]] != idx[order[j - 1]] + 1:
                lo, hi = int(idx[order[run_start]]), int(idx[order[j - 1]]) + 1
                out[order[run_start:j]] = self._read(lo, hi)
                run_start = j
        return out

    def subset(self, index: np.ndarray):
        """The images at ``index`` as a :class:`~onnxsal.data.Dataset` (for the benchmark)."""
        from ..data import Dataset

        idx = np.asarray(index, np.int64)
        return Dataset(self.take(idx), None if self.labels is None else self.labels[idx],
                       [self.names[i] for i in idx], self.source, self.class_names,
                       list(self._ds.notes), list(self._ds.failures))
