"""Export a PyTorch image classifier to ONNX with its preprocessing and class names recorded.

``export`` runs either torch exporter with a dynamic batch axis, gives the file an IR version
onnxruntime 1.31 reads, runs onnx's full checker and writes two metadata entries that
``onnxsal`` reads back:

- ``onnxsal.preprocess``: JSON ``{"scale": s, "mean": [...] | null, "std": [...] | null,
  "bgr": false, "layout": "NCHW"}`` (read by :mod:`onnxsal.preprocess`): the model input is
  ``(x * scale - mean) / std`` of images ``x`` with pixels in [0, 1] (channels reversed first
  when ``bgr``, transposed to NHWC when ``layout`` says so). It is recorded, not baked into the
  graph: onnxsal prepends it so that gradients are taken w.r.t. the [0, 1] pixels.
- ``onnxsal.labels``: JSON list of class names.

``parity`` compares the ONNX file with the torch module on the same inputs.
torch is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxsal.errors import OptionError
from onnxsal.onnx_util import set_ir_version

from .common import (  # noqa: F401
    LABELS_KEY,
    PREPROCESS_KEY,
    finish,
    logits_parity,
    metadata_entries,
    preprocess_spec,
    read_labels,
    set_metadata,
)

LEGACY_OPSETS = range(13, 21)          # torch.onnx.export(dynamo=False)
DYNAMO_MIN_OPSET = 18                  # torch.onnx.export(dynamo=True)


def _example(module, example_input, batch: int = 2):
    import torch

    if isinstance(example_input, torch.Tensor):
        return example_input.detach().float()
    if isinstance(example_input, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(example_input, dtype=np.float32))
    shape = tuple(int(v) for v in example_input)
    if len(shape) == 3:  # (C, H, W): add a batch axis of 2 so no exporter specialises batch 1
        shape = (batch,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise OptionError(f"input shape {shape}: expected (C, H, W) or (N, C, H, W)")
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def export(module, example_input, path: str | os.PathLike | None = None, opset: int = 17,
           dynamo: bool = False, preprocess: str | dict | None = None,
           labels: str | os.PathLike | Sequence[str] | None = None,
           input_name: str = "input", output_name: str = "logits", check: bool = True) -> onnx.ModelProto:
    """Export ``module`` to ONNX (dynamic batch) and write it to ``path`` when given.

    ``example_input``: a tensor/array, or an input shape (C, H, W) or (N, C, H, W).
    ``dynamo=False`` uses the TorchScript exporter (opset 13..20); ``dynamo=True`` the
    torch.export-based one (opset >= 18, needs onnxscript). Returns the ModelProto written.
    """
    import torch

    opset = int(opset)
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise OptionError(f"opset {opset}: the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}")
    if not dynamo and opset not in LEGACY_OPSETS:
        raise OptionError(f"opset {opset}: the legacy exporter supports opsets "
                          f"{LEGACY_OPSETS.start}..{LEGACY_OPSETS.stop - 1}; use dynamo=True for newer")
    pre = preprocess_spec(preprocess)
    names = read_labels(labels)
    module = module.eval()
    x = _example(module, example_input)
    with torch.no_grad():
        out = module(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise OptionError("the module must return one [N, classes] tensor of logits")
    if names is not None and len(names) != out.shape[1]:
        raise OptionError(f"{len(names)} labels for a model with {out.shape[1]} classes")
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset,
                                 input_names=[input_name], output_names=[output_name],
                                 dynamic_shapes=({0: batch},), optimize=True, verbose=False)
        model = prog.model_proto
        onnx.shape_inference.infer_shapes(model)  # raises on an inconsistent graph
    else:
        f = io.BytesIO()
        torch.onnx.export(module, (x,), f, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], dynamo=False,
                          dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
        model = onnx.load_from_string(f.getvalue())
    set_ir_version(model)
    return finish(model, metadata_entries(pre, names), check, path)


def parity(module, onnx_model: str | os.PathLike | onnx.ModelProto, inputs: Any,
           threads: int = 1) -> dict[str, float]:
    """Compare torch and onnxruntime logits on ``inputs`` (array/tensor [N, ...] in the model's
    input space): ``max_abs_logit_diff``, ``max_rel_logit_diff`` (over the logit range) and
    ``argmax_agreement`` (fraction of inputs with the same top class)."""
    import torch

    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    x = np.ascontiguousarray(x, dtype=np.float32)
    module = module.eval()
    with torch.no_grad():
        ref = np.concatenate([module(torch.from_numpy(x[i:i + 256])).numpy() for i in range(0, len(x), 256)])
    return logits_parity(ref, onnx_model, x, threads)


__all__ = ["export", "parity", "preprocess_spec", "read_labels", "set_metadata",
           "PREPROCESS_KEY", "LABELS_KEY"]
