"""Convert JAX/flax image classifiers to ONNX for onnxsal (via jax2onnx).

``export`` takes a function of one NHWC image batch returning [N, classes] logits (or a
function and its parameters, or a flax nnx module) and writes an ONNX file with a symbolic batch
axis, the onnxsal metadata (``onnxsal.preprocess`` with the layout, ``onnxsal.labels``) and
weights over 1 MB in a ``<file>.data`` file beside the model (as jax2onnx itself does).

What jax2onnx 0.17.1 needed here:

- opset >= 18 (opset 17 gave an invalid model); 23 is the default;
- its intermediate shape annotations are sometimes wrong (onnxruntime warns, onnx's full
  checker fails): ``graph.value_info`` is dropped;
- a max pool written as a raw ``lax.reduce_window`` becomes a MaxPool over a 6-D tensor
  (Unsqueeze, Unsqueeze, MaxPool with a 4-D window over N,H,W,C, Squeeze) that onnxruntime's
  CPU kernel refuses ("Unsupported pooling size"): it is rewritten as Transpose, 2-D MaxPool,
  Transpose. (``flax.linen.max_pool`` must be called with keyword arguments: jax2onnx patches
  it with a keyword-only signature.)

jax is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsal.errors import OptionError
from onnxsal.onnx_util import attributes, constants, consumers, producers

from .common import LABELS_KEY, PREPROCESS_KEY, logits_parity, preprocess_spec, read_labels, set_metadata
from .loading import import_object

MIN_OPSET = 18
EXTERNAL_THRESHOLD = 1 << 20   # bytes: tensors this large go to <file>.data


def as_function(source: Any, params: Any = None):
    """A function x -> logits from a callable, ``(apply_fn, params)``, ``apply_fn`` + ``params``
    (flax linen: ``module.apply, variables``), or ``module:function`` returning one of these."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if ":" not in s or Path(s).exists():
            raise OptionError(f"{s}: a JAX model is code, not a file: pass 'module:function' "
                              "returning fn, (apply_fn, params) or an nnx module")
        source = import_object(s)
    if isinstance(source, tuple) and len(source) == 2 and callable(source[0]) and params is None:
        source, params = source
    if isinstance(source, dict) and "fn" in source:
        params = source.get("params", params)
        source = source["fn"]
    if not callable(source):
        raise OptionError(f"expected a JAX function of the image batch, got {type(source).__name__}")
    if params is None:
        return source
    fn = source
    return lambda x: fn(params, x)


def _input_dims(input_shape: Sequence[int], layout: str) -> tuple[int, int, int]:
    shp = tuple(int(v) for v in input_shape)
    if len(shp) != 3 or min(shp) < 1:
        raise OptionError(f"input shape {shp}: expected (C, H, W)")
    c, h, w = shp
    return (h, w, c) if layout == "NHWC" else (c, h, w)


def _const_ints(g: onnx.GraphProto, name: str) -> list[int] | None:
    t = constants(g).get(name)
    return None if t is None else [int(v) for v in numpy_helper.to_array(t).ravel()]


def _leading_unsqueezes(g: onnx.GraphProto, producer: dict, name: str) -> list | None:
    """The Unsqueeze nodes (from ``name`` inwards) that made ``name`` from a tensor x by adding
    exactly two leading unit axes, or None."""
    chain, added = [], 0
    while added < 2:
        n = producer.get(name)
        if n is None or n.op_type != "Unsqueeze" or len(n.input) < 2:
            return None
        axes = _const_ints(g, n.input[1])
        if not axes or any(a < 0 for a in axes):
            return None
        chain.append((n, axes))
        added += len(axes)
        name = n.input[0]
    if added != 2:
        return None
    dims = ["x"] * 4  # any rank: only the two leading positions matter
    for _, axes in reversed(chain):  # innermost first
        for a in sorted(axes):
            dims.insert(a, "1")
    if dims[:2] != ["1", "1"]:
        return None
    return [n for n, _ in chain]


def rewrite_reduce_window_maxpool(model: onnx.ModelProto) -> int:
    """Rewrite Unsqueeze -> Unsqueeze (two leading unit axes) -> MaxPool(window over all dims of x) -> Squeeze(0, 1)
    (jax2onnx's ``lax.reduce_window`` max) as Transpose -> MaxPool -> Transpose over the two
    dims the window leaves alone. Returns how many were rewritten."""
    g = model.graph
    producer, readers = producers(g), consumers(g)
    done = 0
    for pool in [n for n in g.node if n.op_type == "MaxPool"]:
        attrs = attributes(pool)
        k = list(attrs.get("kernel_shape", []))
        chain = _leading_unsqueezes(g, producer, pool.input[0])
        outs = readers.get(pool.output[0], [])
        if (chain is None or len(outs) != 1 or outs[0].op_type != "Squeeze"
                or len(pool.output) != 1 or len(k) < 3):
            continue
        sq = outs[0]
        if len(sq.input) < 2 or sorted(_const_ints(g, sq.input[1]) or []) != [0, 1]:
            continue
        r = len(k)
        s = list(attrs.get("strides", [1] * r))
        d = list(attrs.get("dilations", [1] * r))
        p = list(attrs.get("pads", [0] * 2 * r))
        trivial = [i for i in range(r) if k[i] == 1 and s[i] == 1 and d[i] == 1 and p[i] == 0 and p[r + i] == 0]
        if len(trivial) < 2 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        lead = trivial[:2]
        space = [i for i in range(r) if i not in lead]
        perm = lead + space
        inv = [perm.index(i) for i in range(r)]
        x = chain[-1].input[0]
        base = pool.name or pool.output[0]
        t_in, t_pool = f"{base}_nchw_in", f"{base}_nchw_out"
        new_attrs = {"kernel_shape": [k[i] for i in space], "strides": [s[i] for i in space],
                     "pads": [p[i] for i in space] + [p[r + i] for i in space]}
        if "dilations" in attrs:
            new_attrs["dilations"] = [d[i] for i in space]
        if attrs.get("ceil_mode"):
            new_attrs["ceil_mode"] = attrs["ceil_mode"]
        nodes = [helper.make_node("Transpose", [x], [t_in], perm=perm, name=f"{base}_to_nchw"),
                 helper.make_node("MaxPool", [t_in], [t_pool], name=f"{base}_2d", **new_attrs),
                 helper.make_node("Transpose", [t_pool], [sq.output[0]], perm=inv, name=f"{base}_back")]
        idx = list(g.node).index(sq)
        for i, n in enumerate(nodes):
            g.node.insert(idx + i, n)
        dead = [sq, pool]
        for u in chain:  # the Unsqueezes, from the pool inwards, while nothing else reads them
            if len(readers.get(u.output[0], [])) != 1:
                break
            dead.append(u)
        for n in dead:
            g.node.remove(n)
        done += 1
    return done


def export(fn: Any, input_shape: Sequence[int], path: str | os.PathLike | None = None, *,
           params: Any = None, opset: int = 23, preprocess: str | dict | None = None,
           labels: str | os.PathLike | Sequence[str] | None = None, layout: str = "NHWC",
           input_name: str = "input", output_name: str = "logits", check: bool = True,
           external_threshold: int = EXTERNAL_THRESHOLD) -> onnx.ModelProto:
    """Export a JAX function of an image batch to ONNX (symbolic batch); write ``path`` if given.

    ``fn``: see :func:`as_function`. ``input_shape``: (C, H, W); the function receives
    [N, H, W, C] (``layout="NHWC"``, flax's convention) or [N, C, H, W]. Returns the ModelProto
    (weights inline; the file written keeps tensors over ``external_threshold`` bytes in
    ``<path>.data``).
    """
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    opset = int(opset)
    if opset < MIN_OPSET:
        raise OptionError(f"opset {opset}: jax2onnx needs opset >= {MIN_OPSET} here (17 gave an "
                          "invalid model)")
    layout = layout.upper()
    if layout not in ("NHWC", "NCHW"):
        raise OptionError(f"layout must be NHWC or NCHW, got {layout!r}")
    f = as_function(fn, params)
    dims = _input_dims(input_shape, layout)
    pre = preprocess_spec(preprocess if preprocess is not None else {"scale": 1.0}, layout=layout)
    if pre is None:
        pre = preprocess_spec({"scale": 1.0}, layout=layout)
    pre["layout"] = layout
    names = read_labels(labels)
    out = jax.eval_shape(f, jax.ShapeDtypeStruct((2,) + dims, jnp.float32))
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise OptionError(f"the function returns {getattr(out, 'shape', type(out).__name__)}; "
                          "expected one [N, classes] array of logits")
    if names is not None and len(names) != out.shape[1]:
        raise OptionError(f"{len(names)} labels for a model with {out.shape[1]} classes")
    log = logging.getLogger("onnx_ir")
    level = log.level
    log.setLevel(logging.ERROR)  # jax2onnx's serializer warns about untyped shape constants
    try:
        proto = to_onnx(f, inputs=[("N",) + dims], opset=opset, input_names=[input_name],
                        output_names=[output_name])
    finally:
        log.setLevel(level)
    del proto.graph.value_info[:]
    rewrite_reduce_window_maxpool(proto)
    from onnxsal.onnx_util import set_ir_version

    set_ir_version(proto)
    set_metadata(proto, {PREPROCESS_KEY: json.dumps(pre),
                         **({LABELS_KEY: json.dumps(names)} if names is not None else {})})
    if check:
        onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        save(proto, path, external_threshold)
    return proto


def save(model: onnx.ModelProto, path: str | os.PathLike, external_threshold: int = EXTERNAL_THRESHOLD) -> None:
    """Write ``model``; tensors of at least ``external_threshold`` bytes go to ``<name>.data``
    beside it (read back with :func:`onnxsal.model.load_model`, which checks the paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = any(len(t.raw_data) >= external_threshold for t in model.graph.initializer)
    if not big:
        from onnxsal.model import save_model

        save_model(model, str(path))
        return
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=external_threshold)


def parity(fn: Any, onnx_model: str | os.PathLike | onnx.ModelProto, inputs: np.ndarray, *,
           params: Any = None, threads: int = 1) -> dict[str, float]:
    """Compare JAX and onnxruntime logits on ``inputs`` (the function's own input space and
    layout): max abs/rel logit difference and top-1 agreement."""
    f = as_function(fn, params)
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = np.concatenate([np.asarray(f(x[i:i + 256])) for i in range(0, len(x), 256)])
    if not isinstance(onnx_model, onnx.ModelProto):
        from onnxsal.model import load_model

        onnx_model = load_model(onnx_model)
    return logits_parity(ref, onnx_model, x, threads)


__all__ = ["export", "parity", "save", "as_function", "rewrite_reduce_window_maxpool"]
