"""An adversarial autoencoder folder (``onnxsal train-autoencoder``), read as untrusted input
and run with onnxruntime only (for ABELE, :mod:`onnxsal.methods.abele`; docs/abele.md#format).

The folder holds ``autoencoder.json`` and three ONNX files it names (by default
``encoder.onnx``, ``decoder.onnx``, ``discriminator.onnx``). Every check fails with one
:class:`~onnxsal.errors.InputError` line that names the folder and what is wrong: a missing or
oversized file, a file name that is not a plain name inside the folder (no separators, no
``..``, no symbolic link out of it), an operator outside the small set an autoencoder needs,
or inputs and outputs of the wrong shape (checked in the graph and on a probe run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import InputError, OnnxsalError

FORMAT = "onnxsal-aae/1"
CONFIG = "autoencoder.json"
ROLES = ("encoder", "decoder", "discriminator")
MAX_CONFIG_BYTES = 1 << 20
MAX_FILE_BYTES = 256 << 20
MAX_LATENT = 1024
#: what the three networks may be made of: plain feed-forward operators of the default domain
#: (no control flow, no custom or function domains, nothing that reads files)
ALLOWED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Elu", "Exp", "Expand", "Flatten", "Gather",
    "Gemm", "GlobalAveragePool", "HardSigmoid", "Identity", "InstanceNormalization",
    "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Neg", "Pad", "Relu",
    "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Softmax", "Softplus", "Split", "Sqrt",
    "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Upsample"})


@dataclass
class Autoencoder:
    """The three sessions of an AAE folder and its record."""

    path: str
    latent: int
    input_shape: tuple[int, int, int]
    record: dict[str, Any]
    _sessions: dict[str, Any]

    def _tail(self, role: str) -> tuple[int, ...]:
        return {"encoder": (self.latent,), "decoder": self.input_shape, "discriminator": (1,)}[role]

    def _run(self, role: str, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        sess = self._sessions[role]
        name = sess.get_inputs()[0].name
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
        if not out:
            return np.zeros((0,) + self._tail(role), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Latent codes [N, L] of images [N, C, H, W] in [0, 1]."""
        return self._run("encoder", images).reshape(len(images), self.latent)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Images [N, C, H, W] of latent codes [N, L], clipped to [0, 1]."""
        out = self._run("decoder", z).reshape((len(z),) + self.input_shape)
        return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)

    def discriminate(self, z: np.ndarray) -> np.ndarray:
        """The discriminator's probability [N] that each code is a draw of the prior."""
        return self._run("discriminator", z).reshape(len(z))

    def describe(self) -> dict[str, Any]:
        """The JSON-ready summary explain records (path, latent size, held-out errors)."""
        return {"path": self.path, "latent": self.latent, "input_shape": list(self.input_shape),
                "heldout": self.record.get("heldout"), "format": self.record.get("format")}


def _fail(where: str, what: str) -> InputError:
    return InputError(f"--autoencoder {where}: {what}")


def _config(root: Path, where: str) -> dict[str, Any]:
    cfg = root / CONFIG
    if not cfg.is_file():
        raise _fail(where, f"no {CONFIG} in the folder (make one with `onnxsal train-autoencoder`)")
    if cfg.resolve().parent != root.resolve():
        raise _fail(where, f"{CONFIG} leads outside the folder (a link)")
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise _fail(where, f"{CONFIG} is larger than {MAX_CONFIG_BYTES >> 20} MB")
    try:
        rec = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(where, f"{CONFIG} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise _fail(where, f"{CONFIG} must hold a JSON object")
    if rec.get("format") != FORMAT:
        raise _fail(where, f"{CONFIG}: format must be '{FORMAT}', got {str(rec.get('format'))[:40]!r}")
    lat = rec.get("latent")
    if not isinstance(lat, int) or isinstance(lat, bool) or not 1 <= lat <= MAX_LATENT:
        raise _fail(where, f"{CONFIG}: latent must be an integer 1..{MAX_LATENT}, got {str(lat)[:40]!r}")
    shape = rec.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 14 for v in shape)
            and shape[0] in (1, 3)):
        raise _fail(where, f"{CONFIG}: input_shape must be [C, H, W] with C 1 or 3, got {str(shape)[:60]}")
    return rec


def _member(root: Path, name: Any, role: str, where: str) -> Path:
    """The file ``name`` of ``role``, refused unless it is a plain file name inside the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or os.path.isabs(name) or Path(name).name != name:
        raise _fail(where, f"{CONFIG}: the {role} file must be a plain file name inside the "
                    f"folder, got {str(name)[:80]!r}")
    p = root / name
    if not p.is_file():
        raise _fail(where, f"{role} file {name!r} not found in the folder")
    real, base = p.resolve(), root.resolve()
    if real.parent != base:
        raise _fail(where, f"{role} file {name!r} leads outside the folder (a link)")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise _fail(where, f"{role} file {name!r} is larger than {MAX_FILE_BYTES >> 20} MB")
    return p


def _dims(vi) -> list:
    t = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _check_graph(model: onnx.ModelProto, role: str, name: str, want_in: list, want_out: list,
                 where: str) -> None:
    if model.functions:
        raise _fail(where, f"{role} {name!r}: model functions are not allowed")
    bad = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                  for n in model.graph.node
                  if n.domain not in ("", "ai.onnx") or n.op_type not in ALLOWED_OPS})
    if bad:
        raise _fail(where, f"{role} {name!r}: operators an autoencoder does not need: {', '.join(bad[:6])}")
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    outs = list(model.graph.output)
    if len(ins) != 1 or len(outs) != 1:
        raise _fail(where, f"{role} {name!r}: expected one input and one output, got {len(ins)} and {len(outs)}")
    for what, vi, want in (("input", ins[0], want_in), ("output", outs[0], want_out)):
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise _fail(where, f"{role} {name!r}: the {what} must be float32")
        got = _dims(vi)
        if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got[1:], want[1:], strict=True)):
            raise _fail(where, f"{role} {name!r}: {what} shape {got} does not match "
                        f"[N, {', '.join(map(str, want[1:]))}] (autoencoder.json)")


def load_autoencoder(path: str | os.PathLike, threads: int | None = 1) -> Autoencoder:
    """Read and check an AAE folder; see the module docstring."""
    from .model import load_model
    from .onnx_util import cpu_session

    where = str(path)
    root = Path(path)
    if not root.is_dir():
        raise _fail(where, "not a folder (make one with `onnxsal train-autoencoder`)")
    rec = _config(root, where)
    lat = int(rec["latent"])
    shape = tuple(int(v) for v in rec["input_shape"])
    files = rec.get("files", {role: f"{role}.onnx" for role in ROLES})
    if not isinstance(files, dict):
        raise _fail(where, f"{CONFIG}: files must map encoder, decoder, discriminator to file names")
    io = {"encoder": ([None, *shape], [None, lat]), "decoder": ([None, lat], [None, *shape]),
          "discriminator": ([None, lat], [None, 1])}
    sessions = {}
    for role in ROLES:
        p = _member(root, files.get(role), role, where)
        try:
            model = load_model(p)
        except OnnxsalError as exc:
            raise _fail(where, f"{role}: {' '.join(str(exc).split())}") from None
        if model.ByteSize() > MAX_FILE_BYTES:  # external data counted too
            raise _fail(where, f"{role} file {p.name!r} with its external data is larger than "
                        f"{MAX_FILE_BYTES >> 20} MB")
        _check_graph(model, role, p.name, *io[role], where)
        try:
            sessions[role] = cpu_session(model, threads)
        except Exception as exc:
            raise _fail(where, f"{role} {p.name!r}: onnxruntime cannot run it "
                        f"({' '.join(str(exc).split())[:160]})") from None
    ae = Autoencoder(where, lat, shape, rec, sessions)  # type: ignore[arg-type]
    _probe(ae, where)
    return ae


def _probe(ae: Autoencoder, where: str) -> None:
    """Run each network on two probe inputs: the shapes must be what the record says."""
    z = np.zeros((2, ae.latent), np.float32)
    checks = (("encoder", np.zeros((2,) + ae.input_shape, np.float32), (2, ae.latent)),
              ("decoder", z, (2,) + ae.input_shape), ("discriminator", z, (2, 1)))
    for role, x, want in checks:
        try:
            out = ae._run(role, x)
        except Exception as exc:
            raise _fail(where, f"{role} fails on a probe input ({' '.join(str(exc).split())[:160]})") from None
        if tuple(out.shape) != want:
            raise _fail(where, f"{role} returns shape {list(out.shape)} on a probe input, "
                        f"expected {list(want)}")
        if not np.isfinite(out).all():
            raise _fail(where, f"{role} returns NaN or infinite values on a probe input")


__all__ = ["Autoencoder", "load_autoencoder", "FORMAT", "ALLOWED_OPS"]
