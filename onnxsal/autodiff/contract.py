"""The contract of an augmented model: the names of its roles and how they are recorded.

* the original inputs and outputs stay;
* a new float input ``onnxsal.seed`` carries the cotangent of the logits, shape [K, N, C]
  (K seed rows; an identity seed gives every class);
* for every requested tensor T a new output ``onnxsal.grad.<T>`` holds dS/dT contracted with
  each seed row, shape [K] + shape(T);
* for requested intermediate tensors the forward value is an output too
  (``onnxsal.value.<T>``), and the logits are an output (``onnxsal.logits``).

The roles' tensor names are in ``metadata_props`` under these keys.
"""

from __future__ import annotations

import onnx

META_SEED = "onnxsal.seed"
META_LOGITS = "onnxsal.logits"
META_GRAD = "onnxsal.grad."
META_VALUE = "onnxsal.value."
META_RULES = "onnxsal.rules"
META_INPUT = "onnxsal.input"

def write_roles(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Record the roles in ``metadata_props`` (replacing earlier values of the same keys)."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def augmented_roles(model: onnx.ModelProto) -> dict[str, str]:
    """The onnxsal.* metadata of an augmented model (empty for a plain one)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("onnxsal.")}
