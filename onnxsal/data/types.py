"""The two forms images take: :class:`RawImages` (as read) and :class:`Dataset` (conformed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawImages:
    """Images as read, before any conversion: each ``[H, W, C]`` float32 in ``[0, 1]``."""

    images: list[np.ndarray]
    labels: np.ndarray | None
    names: list[str]
    source: str
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    """Images ready for a model: float32 ``[N, C, H, W]`` in ``[0, 1]``."""

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    source: str
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, labels and names: identifies exactly this data."""
        h = hashlib.sha256()
        h.update(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        h.update("\n".join(self.names).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def subset(self, index: slice | np.ndarray) -> "Dataset":
        names = np.asarray(self.names, dtype=object)[index].tolist()
        return Dataset(self.images[index], None if self.labels is None else self.labels[index],
                       names, self.source, self.class_names, list(self.notes),
                       list(self.failures))

    def describe(self) -> dict:
        """A JSON-ready description (no pixels)."""
        return {
            "source": self.source,
            "count": len(self),
            "shape": list(self.shape),
            "labels": self.labels is not None,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint(),
            "notes": list(self.notes),
            "failures": [{"name": n, "error": e} for n, e in self.failures],
        }
