"""Grad-CAM (Selvaraju et al. 2017), SPEC.md section 6.

A = activations of a 4-D tensor [N, K, h, w] (default: ``engine.default_cam_layer()``, the
last one before global pooling; override with ``layer=<tensor name>``);
alpha_k = spatial mean of dS_c/dA_k; map = ReLU(sum_k alpha_k A_k), upsampled bilinearly
(half-pixel centres, edge values repeated, like torch's ``align_corners=False``) to H x W.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.transform import resize

from ..errors import OptionError
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


class GradCAM(Method):
    name = "gradcam"
    aliases = ("grad_cam",)
    needs = frozenset({"intermediate_gradients"})
    signed = False
    defaults: dict[str, Any] = {"layer": None}
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
        alpha = grad.mean(axis=(2, 3), keepdims=True)
        coarse = np.maximum((alpha * act).sum(axis=1), 0).astype(np.float32)
        maps = upsample(coarse, tuple(x.shape[2:]))
        info = {"layer": layer, "layer_shape": list(act.shape[1:])}
        return Maps(self.name, maps, targets, False, coarse,
                    np.asarray(res.logits, np.float32), info)


METHOD_CLASSES = (GradCAM,)
