"""Preprocessing specs, and the ONNX prefix that applies them inside the graph.

Every method and metric works in one input space: float32 images in [0, 1], NCHW. A model's
own preprocessing (scaling to 0..255, mean/std, BGR order, NHWC layout) is prepended to its
graph as ONNX operators, so gradients are taken with respect to the raw pixels and deletion
happens before normalisation (docs/definitions.md#deletion).

The model input receives ``(x' * scale - mean) / std`` where x' is x with its channels reversed
when ``bgr`` (so mean and std are in the model's channel order), transposed to NHWC when the
model wants that layout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError, ModelError, OptionError
from .model import FLOAT_TYPES, InputSpec, type_name
from .onnx_util import all_names, name_allocator

META_PREPROCESS = "onnxsal.preprocess"
META_LABELS = "onnxsal.labels"
RAW_INPUT = "onnxsal_image"


class DynamicSizeError(OptionError):
    """The model's input has dynamic H and W and no size was given."""


@dataclass(frozen=True)
class PreprocessSpec:
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False
    layout: str | None = None  # "NCHW" or "NHWC"; None: as the model's input says
    size: tuple[int, int] | None = None  # (H, W) for models with a dynamic spatial size
    notes: tuple[str, ...] = field(default=(), compare=False)

    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.mean is None and self.std is None and not self.bgr

    def shifted(self, c: float) -> PreprocessSpec:
        """The preprocessing of inputs shifted by the constant ``c``: it takes x + c where this
        one takes x, and gives the model the same values, ((x + c) * scale - (mean + c * scale))
        / std = (x * scale - mean) / std: the shift-compensated model of the input-invariance
        test (docs/metrics.md#input-invariance-input-invariance)."""
        if not c:
            return self
        mean = self.mean if self.mean is not None else (0.0,)
        return replace(self, mean=tuple(float(m) + float(c) * self.scale for m in mean))

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "notes" and v not in (None, False)}
        return json.dumps(d, sort_keys=True)

    def describe(self) -> str:
        parts = []
        if self.scale != 1.0:
            parts.append(f"x*{self.scale:g}")
        if self.mean is not None:
            parts.append("-mean(" + ",".join(f"{m:g}" for m in self.mean) + ")")
        if self.std is not None:
            parts.append("/std(" + ",".join(f"{s:g}" for s in self.std) + ")")
        if self.bgr:
            parts.append("RGB->BGR")
        if self.layout:
            parts.append(self.layout)
        return " ".join(parts) or "none (model takes [0,1] pixels)"


PRESETS: dict[str, PreprocessSpec] = {
    "none": PreprocessSpec(),
    # torchvision's ImageNet models
    "imagenet": PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # the same statistics on 0..255 pixels
    "imagenet255": PreprocessSpec(scale=255.0, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
    # Keras "tf" mode: [-1, 1]
    "tf": PreprocessSpec(scale=2.0, mean=(1.0,), std=(1.0,)),
    # Keras "caffe" mode: BGR, 0..255, ImageNet means subtracted
    "caffe": PreprocessSpec(scale=255.0, mean=(103.939, 116.779, 123.68), bgr=True),
    # EfficientNet-Lite: (x*255 - 127) / 128
    "lite": PreprocessSpec(scale=255.0, mean=(127.0,), std=(128.0,)),
    "x255": PreprocessSpec(scale=255.0),
}


def _floats(text: str, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OptionError(f"preprocessing: '{key}={text}' is not a list of numbers") from None


def _number(text: str, key: str) -> float:
    vals = _floats(text, key)
    if len(vals) != 1:
        raise OptionError(f"preprocessing: '{key}={text}' must be one number")
    return vals[0]


def parse_size(text: str, what: str = "preprocessing: 'size'") -> tuple[int, int]:
    """(H, W) from 'HxW', 'H,W' or one number for a square; ``what`` names the option in errors."""
    try:
        dims = [int(v) for v in text.lower().replace("x", ",").split(",") if v.strip()]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or not all(0 < v <= 1 << 16 for v in dims):
        raise OptionError(f"{what} {text!r} must be HxW (or one number for a square), positive")
    return dims[0], dims[-1]


def validated(spec: PreprocessSpec) -> PreprocessSpec:
    """The spec if the ONNX prefix can use it; otherwise an OptionError saying what is wrong."""
    if not math.isfinite(spec.scale) or spec.scale == 0:
        raise OptionError(f"preprocessing: scale must be a finite, non-zero number, got {spec.scale}")
    for name, vals in (("mean", spec.mean), ("std", spec.std)):
        if vals is None:
            continue
        if not vals:
            raise OptionError(f"preprocessing: {name} needs at least one number")
        if not all(math.isfinite(v) for v in vals):
            raise OptionError(f"preprocessing: {name} must be finite numbers, got {list(vals)}")
    if spec.std is not None and any(v == 0 for v in spec.std):
        raise OptionError(f"preprocessing: std must not be 0, got {list(spec.std)}")
    if spec.layout not in (None, "NCHW", "NHWC"):
        raise OptionError(f"preprocessing: layout must be NCHW or NHWC, got {spec.layout!r}")
    if spec.size is not None and (len(spec.size) != 2 or not all(
            isinstance(v, int) and 0 < v <= 1 << 16 for v in spec.size)):
        raise OptionError(f"preprocessing: size must be two positive integers (H, W), got "
                          f"{list(spec.size)}")
    return spec


def parse(text: str | None) -> PreprocessSpec | None:
    """A preset name, JSON, or tokens such as ``scale=255 mean=123.7,116.3,103.5 std=58.4 bgr nhwc``."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text in PRESETS:
        return PRESETS[text]
    if text.startswith("{"):
        return from_json(text)
    spec = PreprocessSpec()
    for tok in text.replace(";", " ").split():
        key, _, val = tok.partition("=")
        key = key.lower()
        if key in PRESETS and not val:
            spec = replace(PRESETS[key], layout=spec.layout, size=spec.size)
        elif key == "scale":
            spec = replace(spec, scale=_number(val, key))
        elif key in ("mean", "std"):
            spec = replace(spec, **{key: _floats(val, key)})
        elif key in ("bgr", "rgb") and not val:
            spec = replace(spec, bgr=key == "bgr")
        elif key in ("nhwc", "nchw") and not val:
            spec = replace(spec, layout=key.upper())
        elif key == "size":
            spec = replace(spec, size=parse_size(val))
        else:
            raise OptionError(f"preprocessing: unknown item '{tok}' (presets: {', '.join(PRESETS)}; "
                              f"keys: scale=, mean=, std=, bgr, nhwc, nchw, size=HxW)")
    return validated(spec)


MAX_META_JSON = 16 << 20  # characters of one JSON metadata entry (labels of 20k classes fit)


def _meta_json(text: str):
    """``json.loads`` of JSON a model or labels file carries: more than :data:`MAX_META_JSON`
    characters or nesting deeper than Python's recursion limit is a ValueError like any
    invalid JSON."""
    if len(text) > MAX_META_JSON:
        raise ValueError(f"{len(text):,} characters, beyond the {MAX_META_JSON:,} read")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def from_json(text: str) -> PreprocessSpec:
    try:
        d = _meta_json(text)
        layout = d.get("layout")
        spec = PreprocessSpec(
            scale=float(d.get("scale", 1.0)),
            mean=tuple(float(v) for v in d["mean"]) if d.get("mean") is not None else None,
            std=tuple(float(v) for v in d["std"]) if d.get("std") is not None else None,
            bgr=bool(d.get("bgr", False)),
            layout=layout.upper() if isinstance(layout, str) else layout,
            size=tuple(int(v) for v in d["size"]) if d.get("size") else None,
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        raise OptionError(f"preprocessing: invalid JSON spec ({exc})") from None
    except RecursionError:  # deeply nested JSON (a hostile file's metadata)
        raise OptionError("preprocessing: invalid JSON spec (nested too deeply)") from None
    return validated(spec)


def from_model(model: onnx.ModelProto) -> PreprocessSpec | None:
    """The spec a converter wrote into the model's metadata, if any."""
    for p in model.metadata_props:
        if p.key == META_PREPROCESS:
            return from_json(p.value)
    return None


def labels_from_json(data) -> list[str] | None:
    """Class names from parsed JSON: a list of names, {"0": name, ...}, Keras's
    ``class_indices`` {name: index}, or its ``imagenet_class_index.json`` {"0": [id, name]};
    None when it is none of these."""
    if isinstance(data, dict) and data:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            by_index = {v: k for k, v in data.items()}  # {name: index}
        else:
            try:
                by_index = {int(k): v for k, v in data.items()}
            except (ValueError, TypeError):
                return None
        if sorted(by_index) != list(range(len(data))):
            return None
        data = [by_index[i] for i in range(len(data))]
        if all(isinstance(v, list) and v and all(isinstance(e, str) for e in v) for v in data):
            data = [v[-1] for v in data]  # [wordnet id, name]
    if not isinstance(data, list) or not all(isinstance(v, (str, int, float)) for v in data):
        return None
    return [str(v) for v in data]


def labels_from_model(model: onnx.ModelProto) -> list[str] | None:
    for p in model.metadata_props:
        if p.key == META_LABELS:
            try:
                return labels_from_json(_meta_json(p.value))
            except ValueError:
                return None
    return None


def read_labels(labels: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """Class names from a list, or a file: a JSON list, a JSON object {"0": name, ...} or
    {name: 0, ...} (Keras's class_indices; see labels_from_json), or one name per line."""
    if labels is None:
        return None
    if not isinstance(labels, (str, os.PathLike)):
        return [str(v) for v in labels]
    path = Path(labels)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"labels file {path}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            data = _meta_json(text)
        except ValueError as exc:
            raise InputError(f"labels file {path}: invalid JSON ({exc})") from None
        names = labels_from_json(data)
        if names is None:
            raise InputError(f"labels file {path}: expected a JSON list of names, an object "
                             "{\"0\": name, ...} or Keras's class_indices {name: 0, ...} with "
                             "indices 0..n-1")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def raw_shape(inp: InputSpec, spec: PreprocessSpec | None) -> tuple[int, int, int]:
    """(C, H, W) of the [0, 1] input space for this model and spec."""
    if spec is not None and spec.layout and spec.layout != inp.layout:
        inp = replace(inp, layout=spec.layout)  # a recorded layout beats the shape heuristic
    c = inp.channels
    h, w = inp.spatial
    if spec is not None and spec.size is not None:
        h, w = spec.size
    if not isinstance(c, int):
        raise ModelError(f"input '{inp.name}' has a dynamic channel count; cannot tell grey from RGB")
    if not isinstance(h, int) or not isinstance(w, int):
        raise DynamicSizeError(f"input '{inp.name}' has a dynamic image size {inp.shape}; give one "
                               f"with --preprocess 'size=HxW'")
    return c, h, w


def _check_prepend(spec: PreprocessSpec, inp: InputSpec, c: int) -> None:
    """Refuse a preprocessing that does not fit the input: per-channel values for another
    channel count, BGR order without 3 channels, a non-float input."""
    for name, vals in (("mean", spec.mean), ("std", spec.std)):
        if vals is not None and len(vals) not in (1, c):
            raise OptionError(f"preprocessing: {name} has {len(vals)} values for a {c}-channel input")
    if spec.bgr and c != 3:
        raise OptionError(f"preprocessing: BGR order needs 3 channels, the model has {c}")
    if inp.elem_type not in FLOAT_TYPES:
        raise ModelError(f"input '{inp.name}' is {type_name(inp.elem_type)}; only float "
                         f"inputs can be explained by gradients")


def prepend(model: onnx.ModelProto, spec: PreprocessSpec | None, inp: InputSpec) -> onnx.ModelProto:
    """A copy of ``model`` whose image input takes [0, 1] NCHW float32 pixels."""
    spec = spec or PreprocessSpec()
    layout = spec.layout or inp.layout
    c, h, w = raw_shape(inp, spec)
    needs_cast = inp.elem_type != TensorProto.FLOAT
    if spec.is_identity() and layout == "NCHW" and not needs_cast:
        return model
    _check_prepend(spec, inp, c)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    names = all_names(g)  # with the names inside subgraphs, which a fresh name must not shadow
    raw = RAW_INPUT
    while raw in names:
        raw += "_"
    nodes, inits = [], []
    fresh = name_allocator(names, "onnxsal_pre_")

    def const(arr):
        name = fresh("c")
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    cur = raw
    if spec.bgr:  # first, so that mean and std are given in the model's channel order
        out = fresh("bgr")
        idx = fresh("idx")
        inits.append(numpy_helper.from_array(np.asarray([2, 1, 0], np.int64), idx))
        nodes.append(helper.make_node("Gather", [cur, idx], [out], axis=1, name=fresh("Gather")))
        cur = out
    steps = []
    if spec.scale != 1.0:
        steps.append(("Mul", const(spec.scale)))
    if spec.mean is not None:
        steps.append(("Sub", const(np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1))))
    if spec.std is not None:
        steps.append(("Div", const(np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1))))
    for op, c_name in steps:
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, [cur, c_name], [out], name=fresh(op)))
        cur = out
    if layout == "NHWC":
        out = fresh("nhwc")
        nodes.append(helper.make_node("Transpose", [cur], [out], perm=[0, 2, 3, 1], name=fresh("Transpose")))
        cur = out
    if needs_cast:
        out = fresh("cast")
        nodes.append(helper.make_node("Cast", [cur], [out], to=inp.elem_type, name=fresh("Cast")))
        cur = out
    # the last prefix node writes the model's original input tensor
    if nodes:
        nodes[-1].output[0] = inp.name
    else:
        nodes.append(helper.make_node("Identity", [raw], [inp.name], name=fresh("Identity")))
    old = [vi for vi in g.input if vi.name == inp.name][0]
    new_inputs = [helper.make_tensor_value_info(raw, TensorProto.FLOAT, [inp.shape[0], c, h, w])]
    new_inputs += [vi for vi in g.input if vi.name != inp.name]
    del g.input[:]
    g.input.extend(new_inputs)
    g.value_info.append(old)
    all_nodes = nodes + list(g.node)
    del g.node[:]
    g.node.extend(all_nodes)
    g.initializer.extend(inits)
    return model
