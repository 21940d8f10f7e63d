"""Grad-CAM (Selvaraju et al. 2017), docs/definitions.md#method-defaults.

A = activations of a 4-D tensor [N, K, h, w] ([N, h, w, K] when the graph uses it channels-last,
see :func:`channel_axis`) (default: ``engine.default_cam_layer()``, the
last one before global pooling; override with ``layer=<tensor name>``);
alpha_k = spatial mean of dS_c/dA_k; map = ReLU(sum_k alpha_k A_k), upsampled bilinearly
(half-pixel centres, edge values repeated, like torch's ``align_corners=False``) to H x W.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import numpy as np
from onnx import numpy_helper
from skimage.transform import resize

from ..errors import OptionError
from ..onnx_util import attribute, attributes, constants, consumers, producers
from .base import Maps, Method, one_hot_seed


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of [N, h, w] maps to [N, H, W] (scikit-image, order 1)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[1:] == tuple(size):
        return maps.copy()
    out = np.empty((len(maps),) + tuple(size), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = resize(m, size, order=1, mode="edge", anti_aliasing=False,
                        preserve_range=True)
    return out


_PASS_THROUGH = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Elu",
                 "Selu", "Gelu", "Identity", "Mul", "Add", "Div", "Sub", "BatchNormalization")


# operators whose 4-D output is NCHW by ONNX's definition
_NCHW_PRODUCERS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool",
                   "LpPool", "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization",
                   "LRN", "DepthToSpace", "SpaceToDepth")


_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


class Layouts:
    """How a graph lays out its 4-D tensors: 1 (NCHW), 3 (NHWC) or None (the graph does not
    say). A tensor shares its layout with every tensor it is joined to through elementwise ops
    (a residual Add, a ReLU, a scale); the nearest of those with evidence decides:

    - written by a convolution or pooling (NCHW by ONNX's definition); a Transpose with perm
      (0, 2, 3, 1) writes NHWC, (0, 3, 1, 2) NCHW;
    - read by a reduction over axes (1, 2) (a spatial mean, as jax2onnx and unoptimised TF
      exports write) or over the last axis (a LayerNorm of a channels-last stage, as in Swin):
      NHWC; by one over (2, 3), a convolution or pooling, or a Transpose (0, 2, 3, 1): NCHW;
      by a Transpose (0, 3, 1, 2): NHWC.

    The 4-D tensors inside attention ([N, heads, tokens, width], or [tokens, N heads, ...] as
    torch's MultiheadAttention exports them) have none of this: they are not images."""

    def __init__(self, model):
        g = model.graph
        self.producer, self.readers, self.consts = producers(g), consumers(g), constants(g)
        self.memo: dict[str, int | None] = {}

    def _axes(self, n) -> list[int] | None:
        axes = attributes(n).get("axes")
        if axes is None and len(n.input) > 1 and n.input[1] in self.consts:
            axes = numpy_helper.to_array(self.consts[n.input[1]]).ravel().tolist()
        return None if axes is None else sorted(int(a) % 4 for a in axes)

    def _direct(self, t: str) -> int | None:
        """Evidence from the node that writes ``t`` and those that read it."""
        n = self.producer.get(t)
        if n is not None:
            if n.op_type in _NCHW_PRODUCERS:
                return 1
            if n.op_type == "Transpose":
                got = {_TO_NHWC: 3, _TO_NCHW: 1}.get(tuple(attribute(n, "perm", default=())))
                if got is not None:
                    return got
        for n in self.readers.get(t, []):
            if n.op_type.startswith("Reduce"):
                axes = self._axes(n)
                if axes in ([1, 2], [3]):
                    return 3
                if axes == [2, 3]:
                    return 1
            elif n.op_type == "Transpose":
                got = {_TO_NHWC: 1, _TO_NCHW: 3}.get(tuple(attribute(n, "perm", default=())))
                if got is not None:
                    return got
            elif n.op_type in _NCHW_PRODUCERS and n.input[0] == t:
                return 1
        return None

    def _joined(self, t: str) -> list[str]:
        """The tensors one elementwise op away from ``t`` (constants left out)."""
        out = []
        n = self.producer.get(t)
        if n is not None and n.op_type in _PASS_THROUGH:
            out += [i for i in n.input if i and i not in self.consts]
        out += [n.output[0] for n in self.readers.get(t, []) if n.op_type in _PASS_THROUGH and n.output]
        return out

    def evidence(self, layer: str) -> int | None:
        if layer not in self.memo:
            found, todo, seen = None, deque([layer]), {layer}
            while todo and found is None:  # breadth first: the nearest evidence wins
                t = todo.popleft()
                found = self._direct(t)
                for u in self._joined(t):
                    if u not in seen:
                        seen.add(u)
                        todo.append(u)
            self.memo[layer] = found
        return self.memo[layer]


def channel_axis(model, layer: str) -> int:
    """1 (NCHW) or 3 (NHWC): the channel axis of the 4-D tensor ``layer``, as
    :class:`Layouts` reads it; NCHW (ONNX's own layout) when the graph does not say."""
    return Layouts(model).evidence(layer) or 1


class GradCAM(Method):
    name = "gradcam"
    aliases = ("grad_cam",)
    needs = frozenset({"intermediate_gradients"})
    signed = False
    defaults: ClassVar[dict[str, Any]] = {"layer": None}
    description = "ReLU(sum_k mean(dS_c/dA_k) A_k) at a 4-D layer, upsampled (Selvaraju et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        layer = opts["layer"] or engine.default_cam_layer()
        if not layer:
            raise OptionError("no 4-D activation found for Grad-CAM; pass layer=<tensor name>")
        res = engine.vjp(x, one_hot_seed(targets, engine.num_classes), wrt=[layer])
        if layer not in res.grads or layer not in res.values:
            raise OptionError(f"Grad-CAM layer '{layer}' gave no gradient or activation")
        grad = np.asarray(res.grads[layer], np.float32)[0]
        act = np.asarray(res.values[layer], np.float32)
        if act.ndim != 4 or len(act) != len(x) or grad.shape != act.shape:
            raise OptionError(f"Grad-CAM needs a 4-D activation [N, K, h, w] with the batch first; layer "
                              f"'{layer}' has shape {list(act.shape)} for a batch of {len(x)}")
        if engine.layouts.evidence(layer) == 3:  # NHWC activation: channels last
            act, grad = act.transpose(0, 3, 1, 2), grad.transpose(0, 3, 1, 2)
        alpha = grad.mean(axis=(2, 3), keepdims=True)
        coarse = np.maximum((alpha * act).sum(axis=1), 0).astype(np.float32)
        maps = upsample(coarse, tuple(x.shape[2:]))
        info = {"layer": layer, "layer_shape": list(act.shape[1:])}
        if act.shape[2:] == (1, 1):  # an export with symbolic sizes hides this from default_cam_layer
            info["note"] = f"layer '{layer}' is 1x1 at this input size: the map is constant; name a larger one"
        return Maps(self.name, maps, targets, False, coarse,
                    np.asarray(res.logits, np.float32), info)
