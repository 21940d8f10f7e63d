"""Load, validate and inspect an ONNX image classifier.

A model file is untrusted data: nothing in it is executed, and external-data paths that point
outside the model's folder are refused before anything is read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .contrib import DOMAIN as ORT_DOMAIN
from .contrib import LOWERED
from .errors import ModelError, OptionError
from .onnx_util import MAX_IR_VERSION, ir_version_for, set_ir_version  # noqa: F401 (re-exported)
from .tensors import MAX_MODEL_BYTES, all_graphs, check_external_data, densify, iter_tensors, load_external_data

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
PROBE_BUDGET = 2 << 30  # largest tensor a run outside the engine may make (its default budget)
# Operators whose outputs are integers, booleans or constants: no gradient flows through them,
# so they need no rule (the pass stops at them).
NO_GRADIENT_OPS = frozenset({
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not", "Xor",
    "IsNaN", "IsInf", "EyeLike", "OneHot", "TopK", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "BitShift",
})


@dataclass
class InputSpec:
    name: str
    shape: list  # ints, symbolic names (str) or None
    layout: str  # "NCHW" or "NHWC"
    elem_type: int

    @property
    def channels(self):
        return self.shape[1] if self.layout == "NCHW" else self.shape[3]

    @property
    def spatial(self):
        return tuple(self.shape[2:4]) if self.layout == "NCHW" else tuple(self.shape[1:3])


@dataclass
class LogitsSpec:
    tensor: str  # the tensor whose gradient is taken
    output: str  # the graph output the model returns
    after: str | None  # "Softmax"/"LogSoftmax" when the output is a probability of `tensor`
    num_classes: int | None
    note: str = ""


def type_name(elem_type: int) -> str:
    """ONNX's name of an element type, also for numbers no type has (hostile files)."""
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def dim_of(d) -> int | str | None:
    """One dimension of a declared shape: a positive int, a symbol, or None when dynamic.
    Exporters mark a dynamic axis with dim_value -1 (paddle2onnx) or 0: any value <= 0 is one."""
    if d.HasField("dim_value"):
        return int(d.dim_value) if d.dim_value > 0 else None
    return d.dim_param or None


def _dims(vi) -> list:
    return [dim_of(d) for d in vi.type.tensor_type.shape.dim]


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file safely and validate it with onnx's checker."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"{path}: {size / 2**30:.1f} GiB exceeds the {MAX_MODEL_BYTES >> 30} GiB limit")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the ONNX graph has no nodes")
    check_external_data(model, path.parent)
    load_external_data(model, path.parent, str(path))
    if check:
        validate(model, str(path))
    return densify(model, MAX_MODEL_BYTES)


def validate(model: onnx.ModelProto, where: str = "model") -> None:
    # other domains: the model's own functions (inlined before the pass) and onnxruntime's
    # fused operators that onnxsal writes back as standard ONNX
    local = {(f.domain, f.name) for f in model.functions}
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in ("", "ai.onnx", "ai.onnx.ml") and (n.domain, n.op_type) not in local
                     and not (n.domain == ORT_DOMAIN and n.op_type in LOWERED)})
    if custom:
        raise ModelError(f"{where}: custom operator domains are not supported: {', '.join(custom)}")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise ModelError(f"{where}: opset {op.version} is newer than this onnx supports "
                             f"({newest}); upgrade onnx and onnxruntime")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise ModelError(f"{where}: invalid ONNX model: {msg[:300] or type(exc).__name__}") from None
    seen: set[str] = set()
    for n in model.graph.node:
        if n.name and n.name in seen:
            raise ModelError(f"{where}: invalid ONNX model: two nodes are named '{n.name}'")
        seen.add(n.name)
    _check_tensor_data(model, where)
    _check_declared_shapes(model, where)


def _check_declared_shapes(model: onnx.ModelProto, where: str) -> None:
    """The shapes and types the graph declares for its inputs and outputs agree with what its
    nodes compute (a file that lies about them misleads the gradient pass). Intermediate
    annotations are ignored (some exporters write wrong ones that onnxruntime tolerates), and
    so are inference failures that are not such a disagreement."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    try:
        onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        if "existing shape" in msg or "existing type" in msg:
            detail = msg.split("Inference error(s): ")[-1][:300]
            raise ModelError(f"{where}: the declared input/output shapes or types disagree with "
                             f"the graph: {detail}") from None


def _check_tensor_data(model: onnx.ModelProto, where: str) -> None:
    """Every stored tensor (see iter_tensors) decodes to exactly its shape."""
    from onnx import numpy_helper

    for t, label in iter_tensors(model):
        try:
            numpy_helper.to_array(t)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:200] or type(exc).__name__
            kind = type_name(t.data_type)
            raise ModelError(f"{where}: {label} ({kind}, shape {list(t.dims)}) does not "
                             f"hold data of its shape and type: {msg}") from None


def check_tensor_sizes(model: onnx.ModelProto, budget: int, inputs: dict | None = None) -> onnx.ModelProto:
    """Refuse, before any session runs it, a model one of whose tensors would exceed
    ``budget`` bytes (a ConstantOfShape, Expand, Tile, Range or Resize bomb): sizes from onnx
    shape inference with data propagation, the unknown dimensions of the graph inputs set from
    ``inputs`` (name -> dims) and any still unknown counted as 1. Returns the inferred model
    (the model itself when inference fails: nothing can be said then)."""
    if inputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        for vi in model.graph.input:
            for d, v in zip(vi.type.tensor_type.shape.dim, inputs.get(vi.name, ())):
                if not d.HasField("dim_value"):
                    d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return model
    graphs = [g for g in all_graphs(inferred) if isinstance(g, onnx.GraphProto)]
    producers = {o: n for g in graphs for n in g.node for o in n.output}
    for name, elem_type, dims in (x for g in graphs for x in _typed_shapes(g)):
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        size = int(np.prod(dims, dtype=object)) * itemsize
        if size > budget:
            n = producers.get(name)
            by = f"node '{n.name or n.op_type}' ({n.op_type}) makes" if n is not None else "the graph holds"
            raise ModelError(f"{by} tensor '{name}' of shape {dims} ({type_name(elem_type)}, "
                             f"{size / 2**20:.0f} MiB at batch 1 or its fixed batch), beyond the {budget >> 20} MiB "
                             "memory budget: refused")
    return inferred


def _typed_shapes(g: onnx.GraphProto):
    """(name, element type, dims) of a graph's initializers and of the tensors whose shape
    inference knows, unknown dimensions counted as 1."""
    for t in g.initializer:
        yield t.name, t.data_type, [int(d) for d in t.dims]
    for vi in list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and t.elem_type not in (TensorProto.STRING, TensorProto.UNDEFINED):
            yield vi.name, t.elem_type, [int(d.dim_value) if d.HasField("dim_value") else 1 for d in t.shape.dim]


def content_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def find_image_input(model: onnx.ModelProto, alone: bool = True) -> InputSpec:
    """The image input: the one float graph input of rank 4, NCHW or NHWC. ``alone``: refuse
    a model that needs other inputs too (False for a file with a gradient graph of its own,
    whose other inputs are seeds whatever its metadata says: see onnxsal.trust)."""
    inits = {i.name for i in model.graph.initializer}
    cands = [vi for vi in model.graph.input if vi.name not in inits]
    floats = [vi for vi in cands if vi.type.tensor_type.elem_type in FLOAT_TYPES]
    images = [vi for vi in floats if len(vi.type.tensor_type.shape.dim) == 4]
    ints = [vi for vi in cands if vi not in floats and len(vi.type.tensor_type.shape.dim) == 4]
    if not images and ints:
        vi = ints[0]
        raise ModelError(f"input '{vi.name}' is {type_name(vi.type.tensor_type.elem_type)}"
                         f"{_dims(vi)}: gradients cannot flow into integer pixels; export the model "
                         "with a float image input (and the cast inside the graph)")
    if not images:
        found = ", ".join(f"{vi.name} {type_name(vi.type.tensor_type.elem_type)}"
                          f"{_dims(vi)}" for vi in cands) or "none"
        raise ModelError(f"no float image input of rank 4 (N,C,H,W or N,H,W,C); inputs: {found}")
    vi = images[0]
    seed = next((p.value for p in model.metadata_props if p.key == "onnxsal.seed"), None)
    others = [o.name for o in cands if o is not vi and o.name != seed]  # the seed: an augmented file
    if others and alone:
        raise ModelError(f"the model needs inputs besides the image '{vi.name}': "
                         f"{', '.join(others[:5])}; onnxsal feeds the image only (export the "
                         "model with the others fixed, as initializers or constants)")
    dims = _dims(vi)
    _check_image_dims(vi.name, dims)
    small = (1, 3, 4)
    if dims[1] in small and dims[3] not in small:
        layout = "NCHW"
    elif dims[3] in small and dims[1] not in small:
        layout = "NHWC"
    else:
        layout = "NCHW"
    return InputSpec(vi.name, dims, layout, vi.type.tensor_type.elem_type)


def with_image_size(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose image input has the spatial size (H, W), so that shape
    inference knows every size downstream (a model exported with dynamic H and W)."""
    inp = find_image_input(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    vi = next(v for v in out.graph.input if v.name == inp.name)
    axes = (2, 3) if inp.layout == "NCHW" else (1, 2)
    for axis, value in zip(axes, size):
        d = vi.type.tensor_type.shape.dim[axis]
        if isinstance(dim_of(d), int) and dim_of(d) != value:
            raise OptionError(f"input '{inp.name}' has the fixed shape {inp.shape} ({inp.layout}); "
                              f"size {size[0]}x{size[1]} does not fit it")
        d.Clear()
        d.dim_value = int(value)
    return out


MAX_IMAGE_VALUES = 1 << 28  # values in one declared image (1 GiB of float32)


def _check_image_dims(name: str, dims: list) -> None:
    """A declared image size must fit in memory (a file may claim anything; sizes <= 0 were
    read as dynamic already, see dim_of)."""
    per_image = int(np.prod([d for d in dims[1:] if isinstance(d, int)], dtype=object))
    if per_image > MAX_IMAGE_VALUES:
        raise ModelError(f"input '{name}' declares the shape {dims}: {per_image:,} values per "
                         f"image, beyond the {MAX_IMAGE_VALUES:,} onnxsal takes")


def find_logits(model: onnx.ModelProto, output: str | None = None) -> LogitsSpec:
    """The logits: the classifier's output, or the input of a final Softmax/LogSoftmax."""
    g = model.graph
    outs = [o for o in g.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    if output is not None:
        match = [o for o in g.output if o.name == output]
        if not match:
            raise OptionError(f"the model has no output '{output}'; outputs: "
                              f"{', '.join(o.name for o in g.output)}")
        out = match[0]
    elif not outs:
        raise ModelError("the model has no float output")
    elif len(outs) == 1:
        out = outs[0]
    else:
        two_d = [o for o in outs if len(o.type.tensor_type.shape.dim) == 2]
        if len(two_d) != 1:
            raise OptionError(f"the model has several outputs ({', '.join(o.name for o in outs)}): "
                              f"choose one with --output")
        out = two_d[0]
    shape = out.type.tensor_type.shape if out.type.tensor_type.HasField("shape") else None
    if shape is not None and len(shape.dim) == 0:
        raise ModelError(f"output '{out.name}' is a scalar: a classifier returns logits per "
                         "image (N, classes)")
    producers = {o: n for n in g.node for o in n.output}
    tensor, after, note = out.name, None, ""
    node = producers.get(tensor)
    # look through shape-only wrappers at the end (Identity, Flatten, Reshape, Squeeze)
    while node is not None and node.op_type in ("Identity", "Flatten", "Reshape", "Squeeze"):
        node = producers.get(node.input[0])
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        tensor, after = node.input[0], node.op_type
        note = f"the model ends in {node.op_type}; gradients are taken of its input '{tensor}'"
    elif node is not None and node.op_type == "Sigmoid":
        note = "the output is a Sigmoid probability with no logit inside: explained as is"
    dims = _dims(out)
    classes = dims[-1] if dims and isinstance(dims[-1], int) else None
    return LogitsSpec(tensor, out.name, after, classes, note)


def parameter_count(model: onnx.ModelProto) -> int:
    """Float values the file stores: its initializers and its Constant nodes' tensors (some
    exporters keep every weight in Constant nodes)."""
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
              for a in n.attribute if a.name == "value"]
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in list(model.graph.initializer) + consts
                   if t.data_type in FLOAT_TYPES))


def save_model(model, path: str) -> None:
    """Write a model atomically; large ones keep their weights in a .data file beside it."""
    from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

    from .files import atomic_write

    path = Path(path)
    if model.ByteSize() > (1 << 30):
        path.parent.mkdir(parents=True, exist_ok=True)
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=path.name + ".data")
        write_external_data_tensors(model, str(path.parent))
    atomic_write(path, lambda f: f.write(model.SerializeToString()))


__all__ = ["InputSpec", "LogitsSpec", "load_model",
           "check_tensor_sizes", "validate", "content_hash",
           "find_image_input", "with_image_size", "dim_of", "find_logits", "parameter_count",
           "ir_version_for", "set_ir_version", "save_model"]
