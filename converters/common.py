"""What every converter shares: the metadata onnxsal reads back, finishing an export
(IR version, checker, atomic save) and the parity report against the source framework."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from typing import Any, Iterator

import numpy as np
import onnx

from onnxsal.errors import OptionError
from onnxsal.onnx_util import cpu_session
from onnxsal.preprocess import META_LABELS as LABELS_KEY
from onnxsal.preprocess import META_PREPROCESS as PREPROCESS_KEY
from onnxsal.preprocess import read_labels  # noqa: F401  (re-exported for the converters)


@contextlib.contextmanager
def quiet_frameworks() -> Iterator[None]:
    """Silence what the frameworks print while they load and export (TensorFlow's oneDNN and
    absl banners come from C++ at library load, whatever TF_CPP_MIN_LOG_LEVEL says; torch's
    and keras's warnings): the process's stderr goes to a discarded file meanwhile. Errors still
    arrive as exceptions, and the CLI prints them as one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def preprocess_spec(spec, layout: str = "NCHW") -> dict | None:
    """Normalise a preprocessing spec to the metadata dict: ``spec`` is a dict, a
    :class:`onnxsal.preprocess.PreprocessSpec`, or a string that :func:`onnxsal.preprocess.parse`
    reads (a preset such as ``none``/``imagenet``/``x255``, JSON, or ``scale=255 mean=... std=...``).
    Absent mean/std are written as null (no-op); ``layout`` fills an unset layout."""
    from onnxsal import preprocess as pp

    if spec is None:
        return None
    if isinstance(spec, str):
        spec = pp.parse(spec)
        if spec is None:
            return None
    elif isinstance(spec, dict):
        unknown = set(spec) - {"scale", "mean", "std", "bgr", "layout", "size"}
        if unknown:
            raise OptionError(f"preprocess spec: unknown keys {sorted(unknown)}")
        spec = pp.from_json(json.dumps(spec))
    elif not isinstance(spec, pp.PreprocessSpec):
        raise OptionError(f"preprocess spec must be a dict, a string or a PreprocessSpec, "
                          f"got {type(spec).__name__}")
    lay = (spec.layout or layout).upper()
    if lay not in ("NCHW", "NHWC"):
        raise OptionError(f"preprocess spec: layout must be NCHW or NHWC, got {lay!r}")
    if spec.scale == 0 or (spec.std is not None and any(v == 0 for v in spec.std)):
        raise OptionError("preprocess spec: scale and std must be non-zero")
    out = {"scale": float(spec.scale),
           "mean": None if spec.mean is None else [float(v) for v in spec.mean],
           "std": None if spec.std is None else [float(v) for v in spec.std],
           "bgr": bool(spec.bgr), "layout": lay}
    if spec.size is not None:
        out["size"] = [int(v) for v in spec.size]
    return out


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    """Set (replace) metadata_props entries."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        model.metadata_props.add(key=k, value=v)
    return model


def finish(model: onnx.ModelProto, entries: dict[str, str], check: bool = True,
           path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Write the metadata entries, run onnx's full checker and save atomically when asked."""
    set_metadata(model, entries)
    if check:
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        from onnxsal.model import save_model

        save_model(model, str(path))
    return model


def metadata_entries(pre: dict | None, names: list[str] | None) -> dict[str, str]:
    entries = {}
    if pre is not None:
        entries[PREPROCESS_KEY] = json.dumps(pre)
    if names is not None:
        entries[LABELS_KEY] = json.dumps(names)
    return entries


def run_onnx(model: str | os.PathLike | onnx.ModelProto, x: np.ndarray, threads: int = 1) -> np.ndarray:
    sess = cpu_session(model, threads)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def logits_parity(reference: np.ndarray, onnx_model: Any, x: np.ndarray, threads: int = 1) -> dict:
    """The framework's logits against onnxruntime's on the same inputs: max abs and relative
    (over the logit range) difference, and top-1 agreement."""
    got = run_onnx(onnx_model, x, threads)
    diff = np.abs(reference - got)
    span = float(reference.max() - reference.min()) or 1.0
    return {"max_abs_logit_diff": float(diff.max()), "max_rel_logit_diff": float(diff.max() / span),
            "argmax_agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
            "n": int(len(x))}
