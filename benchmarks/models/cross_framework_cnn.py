"""One small CNN with the same weights in PyTorch, Keras and JAX/flax (for cross-framework checks).

Architecture: conv 3x3 (C -> 8, same padding), ReLU, max pool 2x2, conv 3x3 (8 -> 16, same
padding), ReLU, global average pool, dense (16 -> classes). The canonical weights are numpy
arrays in PyTorch's layout (conv ``[O, I, kh, kw]``, dense ``[out, in]``); the Keras and flax
versions get them transposed (conv kernel ``[kh, kw, I, O]`` = OIHW -> HWIO, dense kernel
``[in, out]``). Global pooling before the dense layer means no flatten, so the NCHW/NHWC
flatten-order trap does not arise here; :func:`flatten_nhwc_to_nchw` shows the permutation a
dense layer after a flatten would need.

The PyTorch model takes NCHW, the Keras and flax ones NHWC. Frameworks import lazily.
"""

from __future__ import annotations

import numpy as np

WIDTHS = (8, 16)


def random_weights(channels: int = 1, classes: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised weights (and small random biases) in PyTorch layout."""
    rng = np.random.default_rng(seed)
    c1, c2 = WIDTHS

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.weight": he((c1, channels, 3, 3), channels * 9),
        "conv1.bias": (rng.standard_normal(c1) * 0.1).astype(np.float32),
        "conv2.weight": he((c2, c1, 3, 3), c1 * 9),
        "conv2.bias": (rng.standard_normal(c2) * 0.1).astype(np.float32),
        "fc.weight": he((classes, c2), c2),
        "fc.bias": (rng.standard_normal(classes) * 0.1).astype(np.float32),
    }


def flatten_nhwc_to_nchw(h: int, w: int, c: int) -> np.ndarray:
    """Index map: row ``i`` of a dense kernel fed by an NHWC flatten equals row ``perm[i]`` of
    the same kernel fed by an NCHW flatten (``kernel_nhwc = kernel_nchw[perm]``)."""
    return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()


def torch_cnn(weights: dict[str, np.ndarray]):
    """The CNN as a torch ``nn.Module`` (NCHW) holding ``weights``."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self, c: int, k: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c, WIDTHS[0], 3, padding=1)
            self.conv2 = nn.Conv2d(WIDTHS[0], WIDTHS[1], 3, padding=1)
            self.fc = nn.Linear(WIDTHS[1], k)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = nn.functional.max_pool2d(x, 2)
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean(dim=(2, 3)))

    c = weights["conv1.weight"].shape[1]
    k = weights["fc.weight"].shape[0]
    m = SmallCNN(c, k)
    m.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in weights.items()})
    return m.eval()


def keras_cnn(weights: dict[str, np.ndarray], height: int, width: int):
    """The CNN as a Keras ``Sequential`` (NHWC) holding ``weights``."""
    import keras

    c = weights["conv1.weight"].shape[1]
    k = weights["fc.weight"].shape[0]
    m = keras.Sequential([
        keras.Input((height, width, c)),
        keras.layers.Conv2D(WIDTHS[0], 3, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Conv2D(WIDTHS[1], 3, padding="same", activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(k, name="fc"),
    ], name="small_cnn")
    m.get_layer("conv1").set_weights([weights["conv1.weight"].transpose(2, 3, 1, 0), weights["conv1.bias"]])
    m.get_layer("conv2").set_weights([weights["conv2.weight"].transpose(2, 3, 1, 0), weights["conv2.bias"]])
    m.get_layer("fc").set_weights([weights["fc.weight"].T, weights["fc.bias"]])
    return m


def flax_cnn(weights: dict[str, np.ndarray]):
    """The CNN as ``(apply_fn, variables)`` of a flax linen module (NHWC)."""
    import flax.linen as nn
    import jax.numpy as jnp

    k = weights["fc.weight"].shape[0]

    class SmallCNN(nn.Module):
        classes: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(WIDTHS[0], (3, 3), padding="SAME", name="conv1")(x))
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: see jax_export
            x = nn.relu(nn.Conv(WIDTHS[1], (3, 3), padding="SAME", name="conv2")(x))
            return nn.Dense(self.classes, name="fc")(x.mean(axis=(1, 2)))

    variables = {"params": {
        "conv1": {"kernel": jnp.asarray(weights["conv1.weight"].transpose(2, 3, 1, 0)),
                  "bias": jnp.asarray(weights["conv1.bias"])},
        "conv2": {"kernel": jnp.asarray(weights["conv2.weight"].transpose(2, 3, 1, 0)),
                  "bias": jnp.asarray(weights["conv2.bias"])},
        "fc": {"kernel": jnp.asarray(weights["fc.weight"].T), "bias": jnp.asarray(weights["fc.bias"])},
    }}
    return SmallCNN(k).apply, variables


def normalize(x, mean: float, std: float):
    """The preprocessing the models expect of [0, 1] pixels (recorded in each ONNX file)."""
    return (x - mean) / std


def framework_gradients(weights: dict[str, np.ndarray], x: np.ndarray, targets: np.ndarray,
                        mean: float, std: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each framework's own autodiff of logit[target] w.r.t. the [0, 1] pixels ``x`` [N, C, H, W]
    (through the normalisation): {"torch"|"keras"|"jax": (logits [N, K], grad [N, C, H, W])}."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    n, c, h, w = x.shape
    out = {}
    tm = torch_cnn(weights)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    lt = tm(normalize(xt, mean, std))
    lt[torch.arange(n), torch.from_numpy(targets)].sum().backward()
    out["torch"] = (lt.detach().numpy(), xt.grad.numpy())

    km = keras_cnn(weights, h, w)
    xk = tf.constant(x.transpose(0, 2, 3, 1))
    with tf.GradientTape() as tape:
        tape.watch(xk)
        lk = km(normalize(xk, mean, std), training=False)
        s = tf.reduce_sum(tf.gather(lk, targets, axis=1, batch_dims=1))
    gk = tape.gradient(s, xk).numpy().transpose(0, 3, 1, 2)
    out["keras"] = (lk.numpy(), gk)

    apply, variables = flax_cnn(weights)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    tj = jnp.asarray(targets)

    def score(xx):
        lg = apply(variables, normalize(xx, mean, std))
        return jnp.take_along_axis(lg, tj[:, None], axis=1).sum(), lg

    (_, lj), gj = jax.value_and_grad(score, has_aux=True)(xj)
    out["jax"] = (np.asarray(lj), np.asarray(gj).transpose(0, 3, 1, 2))
    return out


def export_all(weights: dict[str, np.ndarray], height: int, width: int, folder,
               preprocess: dict | None = None, labels=None) -> dict[str, str]:
    """Export the CNN from each framework with its converter into ``folder``:
    {"torch"|"keras"|"jax": path}."""
    from pathlib import Path

    from converters import jax_export, keras_export, torch_export

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = weights["conv1.weight"].shape[1]
    paths = {f: str(folder / f"small_cnn_{f}.onnx") for f in ("torch", "keras", "jax")}
    torch_export.export(torch_cnn(weights), (c, height, width), paths["torch"], opset=17,
                        preprocess=preprocess, labels=labels)
    keras_export.export(keras_cnn(weights, height, width), paths["keras"], opset=17,
                        preprocess=preprocess, labels=labels)
    apply, variables = flax_cnn(weights)
    jax_export.export(apply, (c, height, width), paths["jax"], params=variables, opset=23,
                      preprocess=preprocess, labels=labels)
    return paths


__all__ = ["random_weights", "torch_cnn", "keras_cnn", "flax_cnn", "framework_gradients",
           "export_all", "normalize", "flatten_nhwc_to_nchw", "WIDTHS"]
