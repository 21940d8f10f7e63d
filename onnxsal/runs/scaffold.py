"""Run keys, the part store, the executor's lifecycle and the model payload (see
:mod:`onnxsal.runs`)."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import code_fingerprint
from ..errors import ModelError
from ..report import atomic_savez


def run_key(fields: dict, fmt: int = 1) -> tuple[str, str]:
    """(20-hex-digit key, canonical JSON) of ``fields``, the storage format and the code
    fingerprint: a part stored under the key is valid exactly for these inputs and code."""
    src = json.dumps({"format": fmt, "code": code_fingerprint(), **fields}, sort_keys=True,
                     default=str)
    return hashlib.sha256(src.encode()).hexdigest()[:20], src


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Store one finished part (an .npz, written atomically)."""
    atomic_savez(path, **arrays)


def load_arrays(path: str | Path, need: set[str]) -> dict[str, np.ndarray] | None:
    """A finished part, or None when it is missing, unreadable or lacks one of ``need`` (then
    the caller recomputes it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in z.files}
    except Exception:
        return None
    return part if need <= set(part) else None


@contextmanager
def executor_session(executor: Any, device: str) -> Iterator[Any]:
    """The executor (None, "local", "ray" or an executor object) opened for ``device``, and
    closed again however the run ends."""
    from ..executors import make_executor

    if executor is None or isinstance(executor, str):
        executor = make_executor(executor or "local")
    executor.for_device(device)
    executor.open()
    try:
        yield executor
    finally:
        executor.close()


def model_payload(model: Any, custom_factory: Callable | None) -> Any:
    """What a remote worker builds a model from: the serialized ModelProto ``model`` (no
    shared file system needed), or the model argument itself for a custom engine factory."""
    return model.SerializeToString() if custom_factory is None else model


@dataclass(frozen=True)
class EngineSpec:
    """How to build the engine of one model anywhere (plain, picklable values).

    ``key`` identifies the model and its options (the shard key); ``model_hash`` is checked
    against the engine a worker builds from the bytes the driver sent. ``factory(model)``
    replaces :class:`onnxsal.engine.Engine` (tests)."""

    key: str
    model_hash: str
    preprocess: Any = None
    device: str = "auto"
    threads: int | None = None
    output: str | None = None
    factory: Callable[[Any], Any] | None = None

    def build(self, model: Any, default_threads: int | None = None):
        """An engine for ``model`` (serialized ONNX bytes, a path or a ModelProto)."""
        if self.factory is not None:
            return self.factory(model)
        import onnx

        from ..engine import Engine

        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        threads = self.threads if self.threads is not None else default_threads
        eng = Engine(model, preprocess=self.preprocess, device=self.device, threads=threads,
                     output=self.output)
        if eng.model_hash != self.model_hash:
            raise ModelError(f"the worker's copy of the model differs from the driver's "
                             f"(hash {eng.model_hash[:12]} != {self.model_hash[:12]})")
        return eng
