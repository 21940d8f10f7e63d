"""Lazy data sources: the list of images of a data set, read only when asked for.

A :class:`DataSource` knows its items (image files, rows of an array) by name, with their
labels and class names, and reads any of them on demand (:meth:`DataSource.load_many`);
:meth:`DataSource.take` gives a source of some of the items only (small and picklable: what a
shard or a remote worker gets). Nothing is decoded before it is asked for.

Kinds here: :class:`FileSource` (image files: a folder of class subfolders, a flat folder, a
list of files, a CSV or text file list) and :class:`ArraySource` (rows of an in-memory uint8 or
float array: the built-in Fashion-MNIST and digits). ``.npz`` files are in
:mod:`onnxsal.data.npz`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError
from .pixels import IMAGE_SUFFIXES, ImageFailure, is_image, read_image_file
from .types import RawImages


class DataSource:
    """Items of a data set, read on demand. Subclasses set ``names``, ``labels`` (int64 per
    item, or None), ``class_names``, ``source`` (a description) and ``notes``, and implement
    :meth:`load` (one item, or :class:`ImageFailure`) and :meth:`take`."""

    names: list[str]
    labels: np.ndarray | None
    class_names: list[str] | None
    source: str
    notes: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as float32 HWC in [0, 1]; :class:`ImageFailure` when it cannot be used."""
        raise NotImplementedError

    def load_many(self, index: Sequence[int]) -> Iterator[tuple[int, np.ndarray | str]]:
        """(i, image) or (i, why it failed) for each item of ``index``, in order."""
        for i in index:
            try:
                yield int(i), self.load(int(i))
            except ImageFailure as exc:
                yield int(i), str(exc)

    def take(self, index: Sequence[int]) -> "DataSource":
        """A source of the items ``index`` only (in that order)."""
        raise NotImplementedError

    def check_reachable(self) -> None:
        """Raise InputError when this process cannot reach the data (remote workers)."""

    def raw(self, limit: int | None = None, batch: int = 64) -> RawImages:
        """The first ``limit`` usable images (all by default), read now: what
        :func:`onnxsal.data.load_raw` returns."""
        images, keep, failures = [], [], []
        for start in range(0, len(self), batch):
            for i, got in self.load_many(range(start, min(len(self), start + batch))):
                if limit is not None and len(images) >= limit:
                    break
                if isinstance(got, str):
                    failures.append((self.names[i], got))
                else:
                    images.append(got)
                    keep.append(i)
            if limit is not None and len(images) >= limit:
                break
        labels = None if self.labels is None else self.labels[keep]
        return RawImages(images, labels, [self.names[i] for i in keep], self.source,
                         self.class_names, list(self.notes), failures)


class FileSource(DataSource):
    """Image files, decoded one by one when read. ``bad`` maps an item to the reason it
    cannot be used before any file is opened (a malformed CSV row)."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray | None,
                 class_names: list[str] | None, source: str, root: Path | None = None,
                 notes: Sequence[str] = (), names: Sequence[str] | None = None,
                 bad: dict[int, str] | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.labels = labels
        self.class_names = class_names
        self.source = source
        self.root = root
        self.notes = list(notes)
        self.names = list(names) if names is not None else [
            str(f.relative_to(root)) if root is not None else str(f) for f in self.files]
        self.bad = dict(bad or {})

    def load(self, i: int) -> np.ndarray:
        if i in self.bad:
            raise ImageFailure(self.bad[i])
        return read_image_file(self.files[i], self.names[i])

    def take(self, index: Sequence[int]) -> "FileSource":
        index = [int(i) for i in index]
        bad = {k: self.bad[i] for k, i in enumerate(index) if i in self.bad}
        return FileSource([self.files[i] for i in index],
                          None if self.labels is None else self.labels[index], self.class_names,
                          self.source, self.root, self.notes, [self.names[i] for i in index], bad)

    def check_reachable(self) -> None:
        where = self.root if self.root is not None else (self.files[0].parent if self.files else None)
        if where is not None and not where.is_dir():
            import socket

            raise InputError(f"the data folder {where} is not reachable on host "
                             f"{socket.gethostname()} (run with --data-from-driver, or put the "
                             "data at the same path on every worker)")


class ArraySource(DataSource):
    """Rows of an in-memory array ``x`` [N, H, W] holding ``scale`` units per 1.0 (255 for
    uint8 Fashion-MNIST, 16 for the digits), converted to float when read."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None, names: list[str], source: str,
                 class_names: list[str] | None, scale: float, notes: Sequence[str] = ()) -> None:
        self.x, self.labels, self.names, self.source = x, labels, list(names), source
        self.class_names, self.scale, self.notes = class_names, scale, list(notes)

    def load(self, i: int) -> np.ndarray:
        row = self.x[i, :, :, None]
        if self.x.dtype == np.uint8:
            return row.astype(np.float32) / np.float32(self.scale)
        return (row / self.scale).astype(np.float32)

    def take(self, index: Sequence[int]) -> "ArraySource":
        index = np.asarray(index, np.int64)
        return ArraySource(self.x[index], None if self.labels is None else self.labels[index],
                           [self.names[i] for i in index], self.source, self.class_names,
                           self.scale, self.notes)


class CallSource(DataSource):
    """Items made by calling ``make(name)`` (scikit-image's sample photographs); any error is
    that item's failure."""

    def __init__(self, names: list[str], source: str) -> None:
        self.names, self.source = list(names), source
        self.labels, self.class_names, self.notes = None, None, []

    def load(self, i: int) -> np.ndarray:
        from skimage import data as skdata

        from .pixels import _to_float_hwc

        name = self.names[i]
        try:
            return _to_float_hwc(getattr(skdata, name)(), name)
        except Exception as exc:  # a sample that needs a download on this machine
            raise ImageFailure(f"{type(exc).__name__}: {exc}") from None

    def take(self, index: Sequence[int]) -> "CallSource":
        return CallSource([self.names[int(i)] for i in index], self.source)


class MemorySource(DataSource):
    """Images already in memory (a :class:`RawImages`), so that in-memory data streams too."""

    def __init__(self, raw: RawImages) -> None:
        self.images, self.labels, self.names = list(raw.images), raw.labels, list(raw.names)
        self.source, self.class_names, self.notes = raw.source, raw.class_names, list(raw.notes)
        self.failures_before = list(raw.failures)  # failures of whoever read the images

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def take(self, index: Sequence[int]) -> "MemorySource":
        index = [int(i) for i in index]
        return MemorySource(RawImages([self.images[i] for i in index],
                                      None if self.labels is None else self.labels[index],
                                      [self.names[i] for i in index], self.source,
                                      self.class_names, self.notes))


# --------------------------------------------------------------------------------------------
# listing files


def folder_source(root: Path) -> FileSource:
    """A folder: one subfolder per class (labels in sorted folder order), or a flat folder of
    images (no labels)."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    if not subdirs:
        files = [p for p in entries if is_image(p)]
        if not files:
            raise InputError(f"folder {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return FileSource(files, None, None, f"folder {root} (no labels)", root)
    class_names = [d.name for d in subdirs]
    files, labels = [], []
    for k, d in enumerate(subdirs):
        for f in sorted(p for p in d.rglob("*") if is_image(p)):
            files.append(f)
            labels.append(k)
    loose = [p for p in entries if is_image(p)]
    notes = [f"{len(loose)} image files directly in {root} ignored (class folders are used)"] \
        if loose else []
    if not files:
        raise InputError(f"folder {root}: no image files in its subfolders")
    return FileSource(files, np.asarray(labels, np.int64), class_names,
                      f"folder {root} ({len(class_names)} classes)", root, notes)


def files_source(paths: Sequence[Path]) -> FileSource:
    """Image files given one by one (no labels)."""
    if not paths:
        raise InputError("no image files given")
    text = ", ".join(str(p) for p in paths[:3])
    if len(paths) > 3:
        text += f", ... ({len(paths)} files)"
    return FileSource(list(paths), None, None, "files: " + text)


def _parse_label(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _list_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a CSV (``path,label``) or text file list (one path a line),
    blank lines and ``#`` comments skipped, a ``path,label`` header dropped."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                rows = [(n + 1, r) for n, r in enumerate(csv.reader(f))]
            else:
                rows = [(n + 1, [line.rstrip("\r\n")]) for n, line in enumerate(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the file list {path}: {exc}") from None
    rows = [(n, r) for n, r in rows if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    if rows and rows[0][1][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise InputError(f"file list {path}: no rows (expected 'path' or 'path,label' lines)")
    return rows


def list_source(path: Path) -> FileSource:
    """A CSV file of ``path,label`` rows (the label a class index or a class name; paths
    relative to the CSV's folder) or a ``.txt`` list of paths. A malformed row is that item's
    failure, not an error."""
    rows = _list_rows(path)
    files, names, raw_labels, bad = [], [], [], {}
    for k, (line, fields) in enumerate(rows):
        p = fields[0].strip()
        names.append(p)
        files.append(Path(p) if Path(p).is_absolute() else path.parent / p)
        if len(fields) > 2:
            bad[k] = f"{path.name} line {line}: expected 'path,label', got {len(fields)} fields"
        raw_labels.append(_parse_label(fields[1].strip()) if len(fields) == 2 and fields[1].strip()
                          else None)
    given = [v for v in raw_labels if v is not None]
    labels, class_names = None, None
    if given:
        named = any(isinstance(v, str) for v in given)
        class_names = sorted({str(v) for v in given}) if named else None
        index = {c: j for j, c in enumerate(class_names or [])}
        labels = np.full(len(rows), -1, np.int64)
        for k, v in enumerate(raw_labels):
            if v is None:
                bad.setdefault(k, f"{path.name} line {rows[k][0]}: no label (other rows have one)")
            elif named:
                labels[k] = index[str(v)]
            elif v < 0:
                bad.setdefault(k, f"{path.name} line {rows[k][0]}: negative class index {v}")
            else:
                labels[k] = v
    kind = "CSV" if path.suffix.lower() == ".csv" else "file list"
    return FileSource(files, labels, class_names, f"{kind} {path} ({len(rows)} rows"
                      + (f", {len(class_names)} classes" if class_names else "") + ")",
                      None, (), names, bad)
