"""Every tensor a model file holds, and the rules for their data: external data only as plain
files inside the model's folder (checked before anything is read, then read into the model so
that onnxruntime never resolves a path against the current folder), and sparse tensors made
dense within a byte limit. onnx's own walker misses sparse tensors, training graphs and
function attributes; :func:`iter_tensors` does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ModelError, first_line

MAX_MODEL_BYTES = 4 << 30  # refuse files (with their external data) beyond 4 GiB


def iter_tensors(model: onnx.ModelProto):
    """Every TensorProto the model holds, as (tensor, label): initializers, sparse tensors'
    values and indices, node attributes (Constant values included), in the main graph, its
    subgraphs, the model's functions and its training graphs. onnx's own walker misses the
    sparse ones, whose external data onnxruntime would then read from the current folder."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        yield from _attribute_tensors(f.attribute_proto, f"function '{f.name}'")
        yield from _node_tensors(f.node)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def _graph_tensors(g: onnx.GraphProto):
    for t in g.initializer:
        yield t, f"tensor '{t.name}'"
    for s in g.sparse_initializer:
        yield from _sparse_parts(s, f"sparse tensor '{s.values.name}'")
    yield from _node_tensors(g.node)


def _node_tensors(nodes):
    for n in nodes:
        yield from _attribute_tensors(n.attribute, f"node '{n.name or n.op_type}'")


def _attribute_tensors(attributes, owner: str):
    for a in attributes:
        where = f"attribute '{a.name}' of {owner}"
        if a.HasField("t"):
            yield a.t, f"tensor '{a.t.name}'" if a.t.name else where
        for t in a.tensors:
            yield t, f"tensor '{t.name}'" if t.name else where
        sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
        for s in sparse:
            yield from _sparse_parts(s, f"sparse tensor '{s.values.name}'" if s.values.name else where)
        if a.HasField("g"):
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)


def _sparse_parts(s: onnx.SparseTensorProto, label: str):
    yield s.values, f"{label} (values)"
    yield s.indices, f"{label} (indices)"


def _location(t: onnx.TensorProto) -> str | None:
    """Where a tensor keeps its data outside the file, or None when it holds them itself."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return next((e.value for e in t.external_data if e.key == "location"), "")


def check_external_data(model: onnx.ModelProto, base: Path | None) -> None:
    """Refuse external data that is not a plain file inside ``base`` (the model's folder),
    and any at all for a model given without a folder (bytes or a ModelProto)."""
    base = base.resolve() if base is not None else None
    total = 0
    for t, label in iter_tensors(model):
        loc = _location(t)
        if loc is None:
            continue
        if base is None:
            raise ModelError(f"{label} keeps its data in '{loc}', but the model was given without "
                             "its folder: load it from its file")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts:
            raise ModelError(f"{label} keeps its data at '{loc}', outside the model's "
                             f"folder: refused")
        full = (base / p)
        if full.is_symlink() or not full.resolve().is_relative_to(base):
            raise ModelError(f"{label} keeps its data at '{loc}', a link leading outside "
                             f"the model's folder: refused")
        if not full.is_file():
            raise ModelError(f"{label} keeps its data in '{loc}', which is missing")
        total += _external_bytes(t, loc, full)
        if total > MAX_MODEL_BYTES:
            raise ModelError(f"{label}: the external data add up to more than the "
                             f"{MAX_MODEL_BYTES >> 30} GiB limit: refused")


def load_external_data(model: onnx.ModelProto, base: Path, where: str) -> None:
    """Read every external tensor (checked by check_external_data) into the model, so that
    no reference is left for onnxruntime to resolve against the current folder."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t, label in iter_tensors(model):
        if _location(t) is None:
            continue
        try:
            load_external_data_for_tensor(t, str(base))
        except Exception as exc:
            raise ModelError(f"{where}: cannot read the external data of {label} ({first_line(exc)})") from None


def _external_bytes(t: onnx.TensorProto, loc: str, full: Path) -> int:
    """Bytes a tensor claims from its external file, checked against the file's size."""
    keys = {e.key: e.value for e in t.external_data}
    try:
        offset = int(keys.get("offset") or 0)
        length = int(keys["length"]) if keys.get("length") else None
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (ValueError, TypeError, KeyError):
        raise ModelError(f"tensor '{t.name}': invalid external-data entry (offset/length/type)") from None
    if offset < 0 or (length is not None and length < 0) or any(d < 0 for d in t.dims):
        raise ModelError(f"tensor '{t.name}': negative offset, length or dimension: refused")
    claim = int(np.prod([int(d) for d in t.dims], dtype=object)) * itemsize
    if claim > MAX_MODEL_BYTES:
        raise ModelError(f"tensor '{t.name}' claims {claim / 2**30:.1f} GiB "
                         f"(shape {list(t.dims)}), beyond the {MAX_MODEL_BYTES >> 30} GiB limit: refused")
    size = full.stat().st_size
    if offset + (length if length is not None else claim) > size:
        raise ModelError(f"tensor '{t.name}' claims {claim} bytes at offset {offset} of '{loc}', "
                         f"which holds {size}: truncated or inconsistent")
    return claim


def densify(model: onnx.ModelProto, limit: int) -> onnx.ModelProto:
    """The model with its sparse tensors (sparse initializers, Constant ``sparse_value``, in
    every graph and function) stored dense, as onnxruntime runs them: the gradient pass reads
    dense tensors only. Refused when their dense forms add up to more than ``limit`` bytes."""
    def sparse_constant(n):
        return n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute)

    if not any(getattr(g, "sparse_initializer", None) or any(sparse_constant(n) for n in g.node)
               for g in all_graphs(model)):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    left = [limit]

    def dense(s):
        t = _dense(s, left[0], limit)
        left[0] -= len(t.raw_data)
        return t

    for g in all_graphs(model):
        if isinstance(g, onnx.GraphProto):
            g.initializer.extend(dense(s) for s in g.sparse_initializer)
            del g.sparse_initializer[:]
        for a in (a for n in filter(sparse_constant, g.node) for a in n.attribute if a.name == "sparse_value"):
            a.CopyFrom(helper.make_attribute("value", dense(a.sparse_tensor)))
    return model


def all_graphs(model: onnx.ModelProto):
    """The model's graph, its subgraphs (recursively), functions and training graphs."""
    stack = [model.graph, *model.functions]
    stack += [g for info in model.training_info for g in (info.initialization, info.algorithm)]
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            for a in n.attribute:
                stack += ([a.g] if a.HasField("g") else []) + list(a.graphs)


def _dense(s: onnx.SparseTensorProto, left: int, limit: int) -> onnx.TensorProto:
    """One sparse tensor as a dense TensorProto of at most ``left`` bytes."""
    from onnx import numpy_helper

    name, shape = s.values.name, [int(d) for d in s.dims]
    try:
        values = numpy_helper.to_array(s.values)
        size = int(np.prod(shape, dtype=object)) * values.dtype.itemsize
        if size > left:
            raise ModelError(f"sparse tensor '{name}' is {size / 2**20:.0f} MiB dense (shape {shape}): "
                             f"the sparse tensors exceed the {limit >> 20} MiB limit: refused")
        dense = np.zeros(int(np.prod(shape, dtype=np.int64)), values.dtype)
        idx = numpy_helper.to_array(s.indices).astype(np.int64)
        flat = idx.reshape(-1) if idx.ndim == 1 else np.ravel_multi_index(tuple(idx.T), shape)
        dense[flat] = values.reshape(-1)
    except (ValueError, IndexError, TypeError) as exc:
        raise ModelError(f"sparse tensor '{name}': its values, indices and shape {shape} do not "
                         f"agree ({first_line(exc)})") from None
    return numpy_helper.from_array(dense.reshape(shape), name)
