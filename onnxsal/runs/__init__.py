"""The resumable-run scaffold shared by ``onnxsal benchmark`` and ``onnxsal sanity``.

A run is split into parts (benchmark shards, sanity steps) that an executor computes
(:mod:`onnxsal.executors`); each finished part is written atomically under a key that hashes
everything it depends on, the code fingerprint included, so a stopped run resumes from its
finished parts and gives what an uninterrupted one gives.
"""

from .scaffold import EngineSpec, executor_session, load_arrays, model_payload, run_key, save_arrays

__all__ = ["EngineSpec", "executor_session", "load_arrays", "model_payload", "run_key",
           "save_arrays"]
