"""The audit's finished parts: each section's result stored under a key of everything it
depends on, so that a stopped audit resumes (a part is reused only when its key matches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..files import atomic_write_json
from ..runs import load_arrays, run_key, save_arrays

FORMAT = 1


class Parts:
    """``DIR/parts/<name>-<key>.npz|json``; ``base`` fields go into every key."""

    def __init__(self, out: Path, base: dict) -> None:
        self.dir = Path(out) / "parts"
        self.base = dict(base)
        self.reused: list[str] = []
        self.computed: list[str] = []

    def _path(self, name: str, fields: dict, suffix: str) -> Path:
        key, _ = run_key({**self.base, "part": name, **fields}, FORMAT)
        return self.dir / f"{name}-{key}{suffix}"

    def arrays(self, name: str, fields: dict, compute: Callable[[], dict[str, np.ndarray]],
               need: set[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of part ``name``: stored ones when present and complete, else computed
        and stored."""
        path = self._path(name, fields, ".npz")
        got = load_arrays(path, need or set())
        if got is not None and got:
            self.reused.append(name)
            return got
        got = {k: np.asarray(v) for k, v in compute().items()}
        self.dir.mkdir(parents=True, exist_ok=True)
        save_arrays(path, got)
        self.computed.append(name)
        return got

    def json(self, name: str, fields: dict, compute: Callable[[], Any]) -> Any:
        """The JSON-ready result of part ``name`` (stored, or computed and stored)."""
        path = self._path(name, fields, ".json")
        if path.is_file():
            try:
                got = json.loads(path.read_text())
                self.reused.append(name)
                return got
            except (OSError, ValueError):
                pass  # unreadable: recomputed
        got = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, got)
        self.computed.append(name)
        return json.loads(path.read_text())  # what a resumed run reads: the same values
