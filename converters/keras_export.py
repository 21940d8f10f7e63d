"""Convert Keras 3 / TensorFlow image classifiers to ONNX for onnxsal.

``export`` takes a Keras model (an object, a ``.keras``/``.h5`` file, or ``module:function``
returning one) and writes an ONNX file with a dynamic batch axis and the model's own layout
(NHWC for the usual ``channels_last`` models; a Transpose inside the graph does the rest), an
IR version onnxruntime reads (<= 10 for opsets <= 21), and the two metadata entries onnxsal
reads back (``onnxsal.preprocess`` with the layout, ``onnxsal.labels``; see
:mod:`converters.torch_export`).

Two routes: ``method="keras"`` uses ``model.export(format="onnx")`` (Keras's own exporter, which
calls tf2onnx under the hood); ``method="tf2onnx"`` calls ``tf2onnx.convert.from_function`` on a
``tf.function`` directly and also takes plain TensorFlow callables (a ``tf.Module`` or a
function of one NHWC tensor). tf2onnx supports opsets up to 18.

Files are loaded with ``keras.saving.load_model(path, compile=False)`` in Keras's safe mode:
a ``.keras`` file that needs arbitrary Python (Lambda layers) is refused, not run.
tensorflow/keras are imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsal.errors import ModelError, OptionError
from onnxsal.onnx_util import set_ir_version

from .common import LABELS_KEY, PREPROCESS_KEY, logits_parity, preprocess_spec, read_labels, set_metadata
from .loading import import_object

TF2ONNX_OPSETS = range(9, 19)      # what tf2onnx 1.17 writes
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def _quiet_tf() -> None:
    """Call before importing tensorflow/keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # With tensorflow 2.21 loaded first, importing torch._dynamo (triton) later in the same
    # process segfaults; loading it first avoids that when torch is installed too.
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass


def load(source: Any, safe_mode: bool = True):
    """A Keras model from an object, a ``.keras``/``.h5``/``.hdf5`` file, or ``module:function``."""
    _quiet_tf()
    if not isinstance(source, (str, os.PathLike)):
        return source
    s = str(source)
    p = Path(s)
    if p.suffix.lower() in KERAS_SUFFIXES:
        if not p.is_file():
            raise OptionError(f"{p}: no such Keras model file")
        import keras

        try:
            return keras.saving.load_model(str(p), compile=False, safe_mode=safe_mode)
        except ValueError as exc:
            if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
                raise ModelError(f"{p}: the model needs arbitrary Python code to load (e.g. a "
                                 "Lambda layer); refused in safe mode") from None
            raise ModelError(f"{p}: cannot load the Keras model ({str(exc).splitlines()[0]})") from None
        except (OSError, TypeError, KeyError) as exc:
            raise ModelError(f"{p}: cannot load the Keras model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if ":" in s and not p.exists():
        return import_object(s)
    if p.is_dir():
        raise OptionError(f"{p}: TensorFlow SavedModel folders are not supported; save the model "
                          "as .keras (model.save('m.keras')) or pass 'module:function'")
    raise OptionError(f"{s}: expected a .keras/.h5 file or 'module:function'")


def _input_spec(model, input_shape: Sequence[int] | None, layout: str | None) -> tuple[tuple, str]:
    """(model input shape without batch, layout) from the model or the (C, H, W) given."""
    lay = layout
    if lay is None:
        try:
            import keras

            lay = "NCHW" if keras.config.image_data_format() == "channels_first" else "NHWC"
        except ImportError:
            lay = "NHWC"
    lay = lay.upper()
    if lay not in ("NCHW", "NHWC"):
        raise OptionError(f"layout must be NHWC or NCHW, got {layout!r}")
    if input_shape is not None:
        shp = tuple(int(v) for v in input_shape)
        if len(shp) != 3 or min(shp) < 1:
            raise OptionError(f"input shape {shp}: expected (C, H, W)")
        c, h, w = shp
        return ((h, w, c) if lay == "NHWC" else (c, h, w)), lay
    shp = getattr(model, "input_shape", None)
    if isinstance(shp, list):
        if len(shp) != 1:
            raise OptionError(f"the model has {len(shp)} inputs; onnxsal explains one image input")
        shp = shp[0]
    if shp is None or len(shp) != 4 or any(v is None for v in shp[1:]):
        raise OptionError(f"cannot tell the model's image size (input shape {shp}); give "
                          "input_shape=(C, H, W) (--input-shape C,H,W)")
    return tuple(int(v) for v in shp[1:]), lay


@contextlib.contextmanager
def _numpy2_patch():
    """tf2onnx 1.17 calls ``np.product`` (removed in numpy 2): alias it while converting."""
    added = not hasattr(np, "product")
    if added:
        np.product = np.prod
    try:
        yield
    finally:
        if added:
            del np.product


def _rename_io(model: onnx.ModelProto, input_name: str, output_name: str) -> None:
    g = model.graph
    inits = {i.name for i in g.initializer}
    ins = [vi for vi in g.input if vi.name not in inits]
    mapping = {}
    if len(ins) == 1 and ins[0].name != input_name:
        mapping[ins[0].name] = input_name
    if len(g.output) == 1 and g.output[0].name != output_name:
        mapping[g.output[0].name] = output_name
    used = {t for n in g.node for t in list(n.input) + list(n.output)} | inits
    if not mapping or any(v in used for v in mapping.values()):
        return
    for n in g.node:
        n.input[:] = [mapping.get(t, t) for t in n.input]
        n.output[:] = [mapping.get(t, t) for t in n.output]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = mapping.get(vi.name, vi.name)


def _via_keras(model, shape: tuple, opset: int) -> onnx.ModelProto:
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.onnx")
        with _numpy2_patch():
            model.export(out, format="onnx", opset_version=opset, verbose=False,
                         input_signature=[keras.InputSpec(shape=(None,) + shape, dtype="float32")])
        return onnx.load(out)


XLA_ATTRS = ("_XlaMustCompile", "_noinline", "_xla_compile_device_type")


def _frozen_graph(f):
    """(graph_def, input names, output names) of a tf.function with its variables and captured
    tensors turned into constants and nested functions inlined.

    tf2onnx alone leaves Keras 3's captured constants (EfficientNet's Normalization mean and
    variance) as extra graph inputs and cannot inline XLA-compiled layer functions (ConvNeXt's
    depthwise convolutions: StatefulPartitionedCall in the ONNX graph); TF's exact GELU uses
    Erfc, which tf2onnx lacks: rewritten as 1 - Erf."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tf2onnx import tf_loader

    frozen = convert_variables_to_constants_v2(f.get_concrete_function())
    gd = frozen.graph.as_graph_def()
    ins, outs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    for node in list(gd.node) + [n for fdef in gd.library.function for n in fdef.node_def]:
        for k in XLA_ATTRS:
            if k in node.attr:
                del node.attr[k]
    for fdef in gd.library.function:
        for k in XLA_ATTRS:
            if k in fdef.attr:
                del fdef.attr[k]
    with tf.Graph().as_default():
        gd = tf_loader.tf_optimize(ins, outs, gd)
    for node in list(gd.node):
        if node.op == "Erfc":
            dtype = node.attr["T"]
            erf = gd.node.add(op="Erf", name=node.name + "/onnxsal_erf", input=[node.input[0]])
            erf.attr["T"].CopyFrom(dtype)
            one = gd.node.add(op="Const", name=node.name + "/onnxsal_one")
            one.attr["dtype"].type = dtype.type
            one.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(1.0, dtype=tf.as_dtype(dtype.type)))
            node.op = "Sub"
            del node.input[:]
            node.input.extend([one.name, erf.name])
    return gd, ins, outs


def _via_tf2onnx(model, shape: tuple, opset: int, input_name: str) -> onnx.ModelProto:
    import tensorflow as tf
    import tf2onnx

    sig = (tf.TensorSpec((None,) + shape, tf.float32, name=input_name),)
    call = model

    @tf.function(input_signature=sig)
    def f(x):
        try:
            return call(x, training=False)
        except TypeError:  # a plain TF callable without the training flag
            return call(x)

    gd, ins, outs = _frozen_graph(f)
    with _numpy2_patch():
        proto, _ = tf2onnx.convert.from_graph_def(gd, input_names=ins, output_names=outs, opset=opset)
    return proto


def _unresolved(proto: onnx.ModelProto) -> list[str]:
    """What keeps an exported graph from running: extra inputs without values, ops that are
    TensorFlow's rather than ONNX's."""
    inits = {i.name for i in proto.graph.initializer}
    extra = [i.name for i in proto.graph.input if i.name not in inits][1:]
    foreign = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")
                      and not onnx.defs.has(n.op_type)})
    return extra + foreign


def export(model: Any, path: str | os.PathLike | None = None, *, input_shape: Sequence[int] | None = None,
           opset: int = 17, preprocess: str | dict | None = None,
           labels: str | os.PathLike | Sequence[str] | None = None, method: str = "keras",
           layout: str | None = None, input_name: str = "input", output_name: str = "logits",
           check: bool = True) -> onnx.ModelProto:
    """Export a Keras model (object, file or ``module:function``) to ONNX; write ``path`` if given.

    ``input_shape``: (C, H, W) when the model does not declare its image size. ``layout``: the
    model's input layout (default: Keras's ``image_data_format``, NHWC). ``preprocess``: what the
    model expects of [0, 1] pixels (a preset such as ``tf`` or ``x255``, or a dict; see
    :func:`converters.torch_export.preprocess_spec`); the layout is always recorded.
    """
    _quiet_tf()
    opset = int(opset)
    if opset not in TF2ONNX_OPSETS:
        raise OptionError(f"opset {opset}: tf2onnx supports opsets {TF2ONNX_OPSETS.start}.."
                          f"{TF2ONNX_OPSETS.stop - 1}")
    if method not in ("keras", "tf2onnx"):
        raise OptionError(f"method {method!r}: expected 'keras' or 'tf2onnx'")
    model = load(model)
    shape, lay = _input_spec(model, input_shape, layout)
    if method == "keras" and not hasattr(model, "export"):
        method = "tf2onnx"  # a plain TensorFlow callable
    pre = preprocess_spec(preprocess if preprocess is not None else "none", layout=lay)
    if pre is None:
        pre = preprocess_spec({"scale": 1.0}, layout=lay)
    pre["layout"] = lay
    names = read_labels(labels)
    x = np.random.default_rng(0).random((2,) + shape, dtype=np.float32)
    ref = _keras_logits(model, x)
    if ref.ndim != 2:
        raise OptionError(f"the model returns shape {list(ref.shape)}; expected [N, classes] logits")
    if names is not None and len(names) != ref.shape[1]:
        raise OptionError(f"{len(names)} labels for a model with {ref.shape[1]} classes")
    proto = _via_keras(model, shape, opset) if method == "keras" else None
    if proto is None or _unresolved(proto):
        # Keras's exporter leaves some models unrunnable (captured constants as inputs, XLA
        # functions as calls): the frozen, inlined graph through tf2onnx converts them
        proto = _via_tf2onnx(model, shape, opset, input_name)
    if _unresolved(proto):
        raise ModelError(f"the exported graph cannot run: {', '.join(_unresolved(proto)[:5])} "
                         f"(unresolved inputs or TensorFlow ops)")
    _rename_io(proto, input_name, output_name)
    set_ir_version(proto)
    set_metadata(proto, {PREPROCESS_KEY: json.dumps(pre),
                         **({LABELS_KEY: json.dumps(names)} if names is not None else {})})
    if check:
        onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        from onnxsal.model import save_model

        save_model(proto, str(path))
    return proto


def _keras_logits(model, x: np.ndarray) -> np.ndarray:
    try:
        out = model(x, training=False)
    except TypeError:
        out = model(x)
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise OptionError(f"the model returns {len(out)} outputs; expected one [N, classes] tensor")
        out = out[0]
    return np.asarray(out)


def layout_of(model: onnx.ModelProto) -> str:
    """The input layout recorded in the metadata (NHWC when none is)."""
    for p in model.metadata_props:
        if p.key == PREPROCESS_KEY:
            return (json.loads(p.value).get("layout") or "NHWC").upper()
    return "NHWC"


def parity(model: Any, onnx_model: str | os.PathLike | onnx.ModelProto, inputs: np.ndarray,
           threads: int = 1) -> dict[str, float]:
    """Compare Keras and onnxruntime logits on ``inputs`` (array [N, ...] in the model's own input
    space and layout): max abs/rel logit difference and top-1 agreement."""
    model = load(model)
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = np.concatenate([_keras_logits(model, x[i:i + 256]) for i in range(0, len(x), 256)])
    if not isinstance(onnx_model, onnx.ModelProto):
        from onnxsal.model import load_model

        onnx_model = load_model(onnx_model)
    return logits_parity(ref, onnx_model, x, threads)


__all__ = ["export", "parity", "load", "layout_of"]
