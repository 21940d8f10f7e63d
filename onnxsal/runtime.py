"""Where and in what size the engine runs: the providers a device choice resolves to (CUDA only
when a session really loads on it, probed once) and the activation-size estimate the engine
batches by."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto

from .errors import OptionError
from .model import check_tensor_sizes, dim_of
from .onnx_util import cpu_session, quiet_options, set_ir_version

DEVICES = ("auto", "cpu", "cuda")

#: CPU provider: the most estimated activation bytes one batch may hold (the per-image
#: estimate of :func:`activation_bytes`, or of a gradient run, times its images). Beyond the
#: last-level cache (480 MiB on the machine measured) a memory-bound model costs more per
#: image: EfficientNet-Lite0 +10-12% (logits) and +20-25% (gradient) CPU time at 16-64 images
#: against 2-4, while ResNet-18 is flat (benchmarks/results/cpu_batch.md).
#: ``$ONNXSAL_CPU_BATCH_BYTES`` or the engine's ``cpu_batch_bytes`` override it; 0 turns the
#: cap off (the memory budget alone).
CPU_BATCH_BYTES = 256 << 20
CPU_BATCH_ENV = "ONNXSAL_CPU_BATCH_BYTES"

_PROVIDER_PROBE: dict[str, bool] = {}


def _cuda_works() -> bool:
    """Whether a session really runs on CUDA here (probed once, quietly)."""
    if "cuda" in _PROVIDER_PROBE:
        return _PROVIDER_PROBE["cuda"]
    import onnxruntime as ort

    ok = False
    if "CUDAExecutionProvider" in ort.get_available_providers():
        from onnx import helper

        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        set_ir_version(m)
        ort.set_default_logger_severity(4)
        try:
            s = ort.InferenceSession(m.SerializeToString(), quiet_options(),
                                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            ok = s.get_providers()[0] == "CUDAExecutionProvider"
        except Exception:
            ok = False
        finally:
            ort.set_default_logger_severity(3)
    _PROVIDER_PROBE["cuda"] = ok
    return ok


def pick_providers(device: str = "auto") -> list[str]:
    if device not in DEVICES:
        raise OptionError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if _cuda_works():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise OptionError("device 'cuda' asked for, but onnxruntime cannot run on CUDA here "
                          "(no GPU, or CUDA/cuDNN libraries missing); use --device cpu or auto")
    return ["CPUExecutionProvider"]


def activation_bytes(model: onnx.ModelProto, input_name: str, shape, budget: int) -> tuple[int, int]:
    """(bytes of all float activations, bytes of the largest one) for one image: the
    batching estimate. A model with a tensor beyond ``budget`` is refused first.

    From shape inference when it knows every dimension; otherwise measured by one run at
    batch 1 with every float tensor exposed (exporters' run-time shapes defeat inference)."""
    inferred = check_tensor_sizes(model, budget, {input_name: (1,) + tuple(shape)})
    total, largest, unknown = 0, 0, False
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        dims = [dim_of(d) for d in t.shape.dim]
        if not t.HasField("shape") or any(not isinstance(d, int) for d in dims[1:]):
            unknown = True
            break
        size = int(np.prod([d if isinstance(d, int) else 1 for d in dims], dtype=np.int64)) * 4
        total, largest = total + size, max(largest, size)
    if not unknown:
        return max(total, 1 << 16), max(largest, 1 << 12)
    import onnxruntime as ort

    m = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for o in node.output:
            if o and o not in outputs:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                outputs.add(o)
    so = quiet_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = cpu_session(m, options=so)
        outs = sess.run(None, {input_name: np.zeros((1,) + tuple(shape), np.float32)})
    except Exception:
        return 64 << 20, 8 << 20
    sizes = [o.nbytes for o in outs if isinstance(o, np.ndarray) and o.dtype.kind == "f"] or [0]
    return max(sum(sizes), 1 << 16), max(max(sizes), 1 << 12)


def cpu_batch_bytes(value: int | None = None) -> int:
    """The CPU batch cap in bytes: ``value`` if given, else ``$ONNXSAL_CPU_BATCH_BYTES``, else
    :data:`CPU_BATCH_BYTES`; 0 means no cap."""
    where = "cpu_batch_bytes"
    if value is None:
        text = os.environ.get(CPU_BATCH_ENV, "").strip()
        if not text:
            return CPU_BATCH_BYTES
        where = f"{CPU_BATCH_ENV}='{text}'"
        try:
            value = int(text)
        except ValueError:
            raise OptionError(f"{where} is not a whole number of bytes (0: no cap)") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise OptionError(f"{where} must be a whole number of bytes >= 0 (0: no cap), not {value!r}")
    return int(value)


def capped_batch(budget_batch: int, bytes_per_image: int, cap: int, parts: int = 1) -> int:
    """The CPU batch: the memory budget's batch, holding at most ``cap`` bytes in all (the
    ``parts`` concurrent one-thread runs of a batch share the last-level cache), but at least
    one image per part."""
    if cap <= 0:
        return budget_batch
    return max(1, min(budget_batch, max(int(parts), cap // max(1, bytes_per_image))))
