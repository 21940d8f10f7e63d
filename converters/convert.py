"""One entry point for ``onnxsal convert torch|keras|jax``: resolve the source, export, check parity.

Sources:

- torch: ``module:function`` returning an ``nn.Module`` (the architecture), optionally with
  ``weights`` = a state-dict file loaded with ``torch.load(weights_only=True)``; a file alone
  (``.pt``/``.pth``) is read the same safe way, so it can hold only weights, never a pickled
  module (that would run arbitrary code).
- keras: a ``.keras``/``.h5`` file (loaded in Keras's safe mode) or ``module:function``.
- jax: ``module:function`` returning ``fn``, ``(apply_fn, params)`` or an nnx module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxsal.errors import OptionError

FRAMEWORKS = ("torch", "keras", "jax")


@dataclass
class Converted:
    framework: str
    out: str
    opset: int
    input_shape: tuple[int, int, int]        # (C, H, W) of the model input
    layout: str
    parity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _torch_module(source: str, weights: str | None):
    import torch

    from .loading import import_object

    p = Path(source)
    if p.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt") or (p.exists() and ":" not in source):
        raise OptionError(f"{source}: a torch file is read with torch.load(weights_only=True), so it "
                          "holds weights, not the architecture: pass 'module:function' returning the "
                          f"nn.Module and --weights {source}")
    module = import_object(source)
    if not isinstance(module, torch.nn.Module):
        raise OptionError(f"{source}: returned {type(module).__name__}, not a torch.nn.Module")
    if weights:
        w = Path(weights)
        if not w.is_file():
            raise OptionError(f"{w}: no such weights file")
        try:
            state = torch.load(str(w), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle.UnpicklingError for anything but plain tensors
            raise OptionError(f"{w}: not a plain state dict readable with weights_only=True "
                              f"({type(exc).__name__})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise OptionError(f"{w}: holds a {type(state).__name__}, not a state dict")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise OptionError(f"{w}: does not fit the module ({str(exc).splitlines()[0]})") from None
    return module.eval()


def _torch_input_shape(module, input_shape):
    if input_shape is None:
        shp = getattr(module, "input_shape", None)
        if shp is None:
            raise OptionError("torch: give the input size with --input-shape C,H,W")
        input_shape = shp
    return tuple(int(v) for v in input_shape)


def convert(framework: str, source: Any, out: str | os.PathLike, *, opset: int | None = None,
            dynamo: bool = False, input_shape: Sequence[int] | None = None,
            preprocess: str | None = None, labels: str | os.PathLike | Sequence[str] | None = None,
            weights: str | None = None, check_parity: bool = True, samples: int = 4) -> Converted:
    """Export ``source`` of ``framework`` to ``out`` and compare it with the framework on
    ``samples`` random inputs. ``input_shape`` is (C, H, W) whatever the model's layout."""
    if framework not in FRAMEWORKS:
        raise OptionError(f"framework {framework!r}: expected one of {', '.join(FRAMEWORKS)}")
    if dynamo and framework != "torch":
        raise OptionError("--dynamo applies to torch only")
    if weights and framework != "torch":
        raise OptionError("--weights applies to torch only (Keras files carry their weights; "
                          "a JAX function returns its parameters)")
    rng = np.random.default_rng(0)
    if framework == "torch":
        from . import torch_export as te

        module = _torch_module(str(source), weights)
        shp = _torch_input_shape(module, input_shape)
        if len(shp) != 3:
            raise OptionError(f"input shape {shp}: expected C,H,W")
        opset = opset or (18 if dynamo else 17)
        te.export(module, shp, out, opset=opset, dynamo=dynamo, preprocess=preprocess, labels=labels)
        res = Converted("torch", str(out), opset, shp, "NCHW")
        if check_parity:
            res.parity = te.parity(module, out, rng.random((samples,) + shp, dtype=np.float32))
        return res
    if framework == "keras":
        from . import keras_export as ke

        model = ke.load(source)
        opset = opset or 17
        proto = ke.export(model, out, input_shape=input_shape, opset=opset, preprocess=preprocess,
                          labels=labels)
        dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
        layout = ke.layout_of(proto)
        c, h, w = (dims[2], dims[0], dims[1]) if layout == "NHWC" else tuple(dims)
        res = Converted("keras", str(out), opset, (c, h, w), layout)
        if check_parity:
            res.parity = ke.parity(model, out, rng.random((samples,) + tuple(dims), dtype=np.float32))
        return res
    from . import jax_export as je

    if input_shape is None:
        raise OptionError("jax: give the input size with --input-shape C,H,W (the function sees N,H,W,C)")
    fn = je.as_function(source)
    opset = opset or 23
    shp = tuple(int(v) for v in input_shape)
    je.export(fn, shp, out, opset=opset, preprocess=preprocess, labels=labels)
    res = Converted("jax", str(out), opset, shp, "NHWC")
    if check_parity:
        c, h, w = shp
        res.parity = je.parity(fn, out, rng.random((samples, h, w, c), dtype=np.float32))
    return res


__all__ = ["convert", "Converted", "FRAMEWORKS"]
