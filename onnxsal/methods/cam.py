"""Grad-CAM (Selvaraju et al. 2017), docs/definitions.md#method-defaults.

A = activations of a 4-D tensor [N, K, h, w] ([N, h, w, K] when the graph uses it channels-last,
see :func:`channel_axis`) (default: ``engine.default_cam_layer()``, the
last one before global pooling; override with ``layer=<tensor name>``);
alpha_k = spatial mean of dS_c/dA_k; map = ReLU(sum_k alpha_k A_k), upsampled bilinearly
(half-pixel centres, edge values repeated, like torch's ``align_corners=False``) to H x W.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
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


def _produced_layout(g, layer: str) -> int | None:
    """1 or 3 from how ``layer`` was made, followed back through elementwise ops: a
    convolution or pooling writes NCHW, a Transpose with perm (0, 2, 3, 1) of it NHWC (as
    tf2onnx writes before a Keras Flatten); None when the producers do not say."""
    producer = producers(g)
    n = producer.get(layer)
    while n is not None:
        if n.op_type in _NCHW_PRODUCERS:
            return 1
        if n.op_type == "Transpose":
            perm = tuple(attribute(n, "perm", default=()))
            return {(0, 2, 3, 1): 3, (0, 3, 1, 2): 1}.get(perm, None)
        if n.op_type not in _PASS_THROUGH or not n.input:
            return None
        n = next((producer[i] for i in n.input if i in producer
                  and producer[i].op_type != "Constant"), None)
    return None


def channel_axis(model, layer: str) -> int:
    """1 (NCHW) or 3 (NHWC): the channel axis of the 4-D tensor ``layer``. From its own
    layout when its producers say (see _produced_layout); else read from what consumes it
    (through elementwise ops): a reduction over axes (1, 2) or a Transpose with perm
    (0, 3, 1, 2) means NHWC (as jax2onnx and unoptimised TF exports write); anything else
    (GlobalAveragePool, Conv, a reduction over (2, 3)) NCHW."""
    from onnx import numpy_helper

    g = model.graph
    own = _produced_layout(g, layer)
    if own is not None:
        return own
    consts = constants(g)
    readers = consumers(g)
    todo, seen = [layer], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for n in readers.get(t, []):
            attrs = attributes(n)
            if n.op_type.startswith("Reduce"):
                axes = attrs.get("axes")
                if axes is None and len(n.input) > 1 and n.input[1] in consts:
                    axes = numpy_helper.to_array(consts[n.input[1]]).ravel().tolist()
                if axes is not None and sorted(int(a) % 4 for a in axes) == [1, 2]:
                    return 3
                if axes is not None:
                    return 1
            elif n.op_type == "Transpose" and list(attrs.get("perm", [])) == [0, 3, 1, 2]:
                return 3
            elif n.op_type in _PASS_THROUGH:
                todo.extend(n.output[:1])
            else:
                return 1
    return 1


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
        if act.ndim != 4:
            raise OptionError(f"Grad-CAM needs a 4-D activation [N, K, h, w]; layer '{layer}' "
                              f"has shape {list(act.shape)}")
        if channel_axis(engine.model, layer) == 3:  # NHWC activation: channels last
            act, grad = act.transpose(0, 3, 1, 2), grad.transpose(0, 3, 1, 2)
        alpha = grad.mean(axis=(2, 3), keepdims=True)
        coarse = np.maximum((alpha * act).sum(axis=1), 0).astype(np.float32)
        maps = upsample(coarse, tuple(x.shape[2:]))
        info = {"layer": layer, "layer_shape": list(act.shape[1:])}
        return Maps(self.name, maps, targets, False, coarse,
                    np.asarray(res.logits, np.float32), info)
