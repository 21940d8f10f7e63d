"""Export a PyTorch classifier together with its gradient graph, traced by PyTorch itself.

``export_with_gradients`` writes an ONNX file with the augmented-model contract of
:func:`onnxsal.autodiff.augment` (see :mod:`onnxsal.autodiff.pass_`): inputs ``input``
[N, C, H, W] and ``onnxsal_seed`` [K, N, classes] (K and N dynamic), outputs ``logits``
[N, classes] and ``onnxsal_grad_input`` [K, N, C, H, W] (row k: the VJP of the logits with the
cotangent ``seed[k]``), and the metadata keys ``onnxsal.seed``, ``onnxsal.logits``,
``onnxsal.grad.input``, ``onnxsal.input`` and ``onnxsal.rules`` = ``default``. It is an
independent second implementation of the gradient graph: PyTorch's own backward formulas,
not onnxsal's rules.

How (torch 2.14):

1. ``make_fx(tracing_mode="symbolic")`` of a function of (weights, x, seed) that folds the K
   seed rows into the batch axis: the model runs on x repeated K times ([K*N, C, H, W]), and
   ``torch.autograd.grad`` of its logits with the cotangent ``seed.reshape(K*N, classes)``
   gives every row at once. The logits come from a separate forward pass on x, so the
   forward part of the file does not depend on the seed input. Attention runs through the
   math SDPA backend (the fused CPU kernel's backward has no ONNX translation). The result is
   an ATen graph with PyTorch's backward operators and symbolic K and N.
2. ``torch.export`` of that graph (weights as buffers) with ``Dim("K")`` and ``Dim("N")``, then
   ``torch.onnx.export(dynamo=True)`` with :func:`translations` for the backward operators the
   exporter cannot lower: ``convolution_backward`` (ConvTranspose), ``avg_pool2d_backward``
   (scaled depthwise ConvTranspose of ones) and ``max_pool2d_with_indices_backward``
   (ScatterElements add; the exporter's own decomposition of it is unavailable in
   deterministic mode). The exporter's decompositions handle the others seen so far
   (threshold, gelu, sigmoid, hardswish, hardtanh, leaky_relu, native_layer_norm,
   native_batch_norm, _softmax_backward_data, select, slice).

Why not ``vmap(vjp)`` (the natural formulation): ``torch.export`` cannot trace it
(``Unsupported: attempted to apply meta conversion to view functorch tensor``, on the saved
transposed Linear weight), and under ``make_fx`` functorch's C++ batching rules of
``convolution_backward`` and ``max_pool2d_with_indices_backward`` read concrete sizes, which
specialises both K and N to the example's values (a graph for one batch size and one seed
count). Folding K into the batch keeps both dynamic at the price of running the forward pass
on (K+1)*N images instead of N and holding K*N copies of the activations (the backward is K*N
in both formulations). It assumes what a classifier in eval mode satisfies: images do not
interact within a batch. Spatial sizes must be static (the translations read them).

torch is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx

from onnxsal.errors import ModelError, OptionError
from onnxsal.onnx_util import set_ir_version

INPUT_NAME = "input"
LOGITS_NAME = "logits"
SEED_NAME = "onnxsal_seed"
GRAD_NAME = "onnxsal_grad_input"


# -- ONNX translations of ATen backward operators --------------------------------------------

def _ints(v, n: int) -> list[int]:
    v = [int(a) for a in (v if isinstance(v, Sequence) else [v])]
    return v * n if len(v) == 1 else v


def _static_shape(value, what: str) -> list[int]:
    shape = value.shape
    dims = list(shape) if shape is not None else None
    if dims is None or not all(isinstance(d, int) for d in dims[2:]):
        raise OptionError(f"{what}: the spatial size must be static to export its gradient "
                          f"(got shape {shape})")
    return dims


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
                          transposed, output_padding, groups, output_mask):
    """aten.convolution_backward, input gradient only: ConvTranspose (or Conv for a transposed
    forward) with the forward's weights; output_padding restores the input's spatial size."""
    from onnxscript import opset18 as op

    if len(output_mask) > 1 and (output_mask[1] or output_mask[2]):
        raise OptionError("convolution_backward: only the input gradient is exported "
                          "(the weights are constants)")
    in_shape = _static_shape(input, "convolution input")
    out_shape = _static_shape(grad_output, "convolution output")
    nd = len(in_shape) - 2
    stride, padding, dilation = _ints(stride, nd), _ints(padding, nd), _ints(dilation, nd)
    kernel = [int(d) for d in weight.shape[2:]]
    if transposed:
        gi = op.Conv(grad_output, weight, strides=stride, pads=padding + padding,
                     dilations=dilation, group=int(groups))
    else:
        extra = [in_shape[2 + i] - ((out_shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                    + dilation[i] * (kernel[i] - 1) + 1) for i in range(nd)]
        gi = op.ConvTranspose(grad_output, weight, strides=stride, pads=padding + padding,
                              dilations=dilation, group=int(groups), output_padding=extra)
    # the weight and bias gradients are never requested (output_mask): placeholders the
    # exporter's optimizer removes as unused
    return gi, op.Identity(gi), op.Identity(gi)


def _max_pool_with_indices_backward(nd: int, grad_output, self, indices):
    """aten.max_pool{2,3}d_with_indices_backward: scatter-add each cotangent into the input
    position it came from (the ATen indices are flat within one (n, c) plane, which is what
    the exporter's max_pool2d_with_indices translation gives too)."""
    from onnxscript import opset18 as op

    lead = len(self.shape) - nd  # 1 (unbatched) or 2
    shape = op.Shape(self)
    flat = op.Concat(op.Shape(self, start=0, end=lead), op.Constant(value_ints=[-1]), axis=0)
    zeros = op.Reshape(op.Expand(op.CastLike(op.Constant(value_float=0.0), grad_output), shape), flat)
    upd = op.Reshape(grad_output, flat)
    idx = op.Reshape(indices, flat)
    out = op.ScatterElements(zeros, idx, upd, axis=lead, reduction="add")
    return op.Reshape(out, shape)


def _max_pool2d_backward(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode,
                         indices):
    return _max_pool_with_indices_backward(2, grad_output, self, indices)


def _max_pool3d_backward(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode,
                         indices):
    return _max_pool_with_indices_backward(3, grad_output, self, indices)


def _avg_pool_backward(nd: int, grad_output, self, kernel_size, stride, padding, ceil_mode,
                       count_include_pad, divisor_override=None):
    """aten.avg_pool{2,3}d_backward: divide each cotangent by its window's divisor (PyTorch's
    rule, borders and ceil_mode included, computed from the static shapes) and spread it over
    the window with a depthwise ConvTranspose of ones."""
    from onnxscript import opset18 as op

    in_shape = _static_shape(self, "avg_pool input")
    out_shape = _static_shape(grad_output, "avg_pool output")
    lead = len(in_shape) - nd
    if lead != 2 or not isinstance(in_shape[1], int):
        raise OptionError(f"avg_pool backward: needs a batched input with a static channel "
                          f"count (got shape {in_shape})")
    k = _ints(kernel_size, nd)
    s = _ints(stride, nd) if stride else list(k)
    p = _ints(padding, nd)
    size_in, size_out = in_shape[2:], out_shape[2:]
    # the divisor of every output position, per axis (PyTorch's avg_pool kernels)
    axes_counts = []
    for i in range(nd):
        full, inner = [], []
        for o in range(size_out[i]):
            start = o * s[i] - p[i]
            end = min(start + k[i], size_in[i] + p[i])
            full.append(end - start)
            inner.append(min(end, size_in[i]) - max(start, 0))
        axes_counts.append((np.array(full), np.array(inner)))
    div = np.ones(size_out)
    for i, (full, inner) in enumerate(axes_counts):
        sh = [1] * nd
        sh[i] = -1
        div = div * (full if count_include_pad else inner).reshape(sh)
    if divisor_override:
        div = np.full(size_out, float(divisor_override))
    scale = op.Constant(value=onnx.numpy_helper.from_array((1.0 / div).astype(np.float32)))
    g = op.Mul(grad_output, op.CastLike(scale, grad_output))
    pads_end, out_pad = [], []
    for i in range(nd):
        end = (size_out[i] - 1) * s[i] + k[i] - p[i] - size_in[i]
        pads_end.append(max(end, 0))
        out_pad.append(max(-end, 0))
    channels = in_shape[1]
    ones = op.CastLike(op.Constant(value=onnx.numpy_helper.from_array(
        np.ones([channels, 1] + k, np.float32))), grad_output)
    return op.ConvTranspose(g, ones, strides=s, pads=p + pads_end, group=channels,
                            output_padding=out_pad)


def _avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode,
                         count_include_pad, divisor_override=None):
    return _avg_pool_backward(2, grad_output, self, kernel_size, stride, padding, ceil_mode,
                              count_include_pad, divisor_override)


def _avg_pool3d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode,
                         count_include_pad, divisor_override=None):
    return _avg_pool_backward(3, grad_output, self, kernel_size, stride, padding, ceil_mode,
                              count_include_pad, divisor_override)


def translations() -> dict:
    """custom_translation_table for torch.onnx.export: backward ATen operators -> ONNX."""
    import torch

    aten = torch.ops.aten
    return {
        aten.convolution_backward.default: _convolution_backward,
        aten.max_pool2d_with_indices_backward.default: _max_pool2d_backward,
        aten.max_pool3d_with_indices_backward.default: _max_pool3d_backward,
        aten.avg_pool2d_backward.default: _avg_pool2d_backward,
        aten.avg_pool3d_backward.default: _avg_pool3d_backward,
    }


# -- tracing -----------------------------------------------------------------------------------

def _folded_vjp(module, names: list[str]):
    """f(tensors, x, seed) -> (logits [N, classes], grads [K, N, ...]) with K folded into the batch."""
    import torch
    from torch.func import functional_call

    def f(tensors, x, seed):
        state = dict(zip(names, tensors))
        k, n = seed.shape[0], x.shape[0]
        # the logits from their own forward pass on x, so that they do not depend on the seed
        # input (a consumer can cut the forward model out of the file)
        y = functional_call(module, state, (x,))
        with torch.enable_grad():
            xr = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
            xr = xr.detach().requires_grad_(True)
            yr = functional_call(module, state, (xr,))
            (g,) = torch.autograd.grad(yr, xr, seed.reshape(yr.shape))
        return y, g.reshape(k, *x.shape)

    return f


def _example(example_input):
    import torch

    if isinstance(example_input, torch.Tensor):
        return example_input.detach().float()
    if isinstance(example_input, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(example_input, dtype=np.float32))
    shape = tuple(int(v) for v in example_input)
    if len(shape) == 3:
        shape = (2,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise OptionError(f"input shape {shape}: expected (C, H, W) or (N, C, H, W)")
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def _dim_param(vi: onnx.ValueInfoProto, axis: int) -> str | None:
    return vi.type.tensor_type.shape.dim[axis].dim_param or None


def _rename_dims(model: onnx.ModelProto, k_sym: str | None, n_sym: str | None) -> None:
    """Name the symbolic dims K and N in the graph's inputs and outputs."""
    ren = {s: t for s, t in ((k_sym, "K"), (n_sym, "N")) if s}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in ren:
                d.dim_param = ren[d.dim_param]


def export_with_gradients(module, example_input, path: str | os.PathLike | None = None,
                          opset: int = 18, wrt_input: bool = True, *,
                          preprocess: str | dict | None = None,
                          labels: str | os.PathLike | Sequence[str] | None = None,
                          check: bool = True) -> onnx.ModelProto:
    """Export ``module`` with the gradient of its logits w.r.t. its input (see module docstring).

    ``example_input``: a tensor/array [N, C, H, W] or a shape (C, H, W) / (N, C, H, W); an
    example batch of 2 or more avoids a batch-1 specialisation. ``opset`` >= 18 (the dynamo
    exporter). ``wrt_input`` must be True (the only gradient this path exports). ``preprocess``
    and ``labels`` are recorded as by :func:`converters.torch_export.export`.
    Returns the ModelProto (written to ``path`` when given).
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from converters.common import finish, metadata_entries, preprocess_spec, read_labels
    from onnxsal.autodiff import META_GRAD, META_INPUT, META_LOGITS, META_RULES, META_SEED

    if not wrt_input:
        raise OptionError("export_with_gradients: only the gradient w.r.t. the input is "
                          "exported (wrt_input=True)")
    opset = int(opset)
    if opset < 18:
        raise OptionError(f"opset {opset}: the dynamo exporter needs opset >= 18")
    pre = preprocess_spec(preprocess)
    names_l = read_labels(labels)
    module = module.eval()
    x = _example(example_input)
    if x.shape[0] < 2:  # a batch of 1 would be specialised by the tracer
        x = x.expand(2, *x.shape[1:]).contiguous()
    with torch.no_grad():
        out = module(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise OptionError("the module must return one [N, classes] tensor of logits")
    classes = int(out.shape[1])
    if names_l is not None and len(names_l) != classes:
        raise OptionError(f"{len(names_l)} labels for a model with {classes} classes")
    k_example = 3 if classes != 3 else 4  # distinct from N and the class count
    seed = torch.randn(k_example, x.shape[0], classes, generator=torch.Generator().manual_seed(0))

    state = {k: v.detach() for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    names = list(state)
    class _Graph(torch.nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.gm = gm
            for i, v in enumerate(state.values()):
                self.register_buffer(f"w{i}", v)

        def forward(self, input, onnxsal_seed):
            return self.gm([getattr(self, f"w{i}") for i in range(len(names))], input, onnxsal_seed)

    dim_n = torch.export.Dim("N", min=1, max=65536)
    dim_k = torch.export.Dim("K", min=1, max=65536)
    try:
        # attention through the math backend: the fused CPU kernel's backward
        # (_scaled_dot_product_flash_attention_for_cpu_backward) has no ONNX translation, the
        # math path's (matmul, softmax) have
        with sdpa_kernel(SDPBackend.MATH):
            gm = make_fx(_folded_vjp(module, names), tracing_mode="symbolic")(
                list(state.values()), x, seed)
        wrapper = _Graph(gm).eval()
        ep = torch.export.export(wrapper, (x, seed),
                                 dynamic_shapes=({0: dim_n}, {0: dim_k, 1: dim_n}))
        prog = torch.onnx.export(ep, dynamo=True, opset_version=opset,
                                 input_names=[INPUT_NAME, SEED_NAME],
                                 output_names=[LOGITS_NAME, GRAD_NAME],
                                 custom_translation_table=translations(), optimize=True,
                                 verbose=False)
    except Exception as exc:  # the exporters' errors are pages long: keep the root cause
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, OptionError):
            raise root from exc
        first = (str(root).strip().splitlines() or [""])[0]
        raise ModelError(f"the model cannot be exported with its gradient graph: "
                         f"{type(root).__name__}: {first}") from exc
    model = prog.model_proto
    ins = {i.name: i for i in model.graph.input}
    _rename_dims(model, _dim_param(ins[SEED_NAME], 0), _dim_param(ins[INPUT_NAME], 0))
    set_ir_version(model)
    entries = {META_SEED: SEED_NAME, META_LOGITS: LOGITS_NAME, META_GRAD + INPUT_NAME: GRAD_NAME,
               META_INPUT: INPUT_NAME, META_RULES: "default", **metadata_entries(pre, names_l)}
    return finish(model, entries, check, path)


__all__ = ["export_with_gradients", "translations", "INPUT_NAME", "LOGITS_NAME", "SEED_NAME",
           "GRAD_NAME"]
