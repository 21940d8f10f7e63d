"""The architectures of the cross-architecture benchmark (benchmarks/cross_architecture.py), for
1-channel 28x28 images with pixels in [0, 1] (no normalisation), 10 classes.

PyTorch: a MobileNetV2-style net (torchvision's ``MobileNetV2`` with a shorter block table and
a stride-1 1-channel stem), a small ConvNeXt (torchvision's ``CNBlock``s on a patchify stem), a
small ViT (torchvision's ``VisionTransformer``, patch 4) and an MLP; the paper's CNN and
ResNet-18 come from :mod:`benchmarks.models.paper_models`. Keras and flax: the paper's CNN and
the MLP, trained natively in each framework (not weight copies). Frameworks import lazily.
"""

from __future__ import annotations

import time

import numpy as np

MLP_WIDTHS = (256, 128)
PAPER_CNN_WIDTHS = (32, 64, 128)


# ----------------------------------------------------------------------------- PyTorch

def torch_mobilenet(num_classes: int = 10):
    """MobileNetV2 blocks (expand t, channels c, repeats n, stride s): (1,16,1,1), (6,24,2,2),
    (6,32,2,1), (6,64,2,1); stem 3x3 stride 2 (1 -> 32; 28 -> 14 -> 7 pixels), last 1x1 conv to
    1280, dropout 0.2."""
    from torch import nn
    from torchvision.models import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    m = MobileNetV2(num_classes=num_classes,
                    inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1], [6, 64, 2, 1]])
    m.features[0] = Conv2dNormActivation(1, 32, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
    return m


def torch_convnext(num_classes: int = 10, dims: tuple[int, int] = (32, 64), depths: tuple[int, int] = (2, 2)):
    """ConvNeXt-style: patchify stem (2x2 stride 2) + LayerNorm, stages of ConvNeXt blocks
    (depthwise 7x7, LayerNorm, 1x1 expand 4x, GELU, 1x1, layer scale), LayerNorm + 2x2 stride-2
    downsampling between stages, global average pool, LayerNorm, Linear."""
    from functools import partial

    from torch import nn
    from torchvision.models.convnext import CNBlock, LayerNorm2d

    layers: list[nn.Module] = [nn.Conv2d(1, dims[0], 2, stride=2), LayerNorm2d(dims[0], eps=1e-6)]
    for i, (d, n) in enumerate(zip(dims, depths)):
        if i:
            layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
        layers += [CNBlock(d, layer_scale=0.1, stochastic_depth_prob=0.0,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(n)]
    head = [nn.AdaptiveAvgPool2d(1), LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)]
    return nn.Sequential(*layers, *head)


def torch_vit(num_classes: int = 10, patch: int = 4, layers: int = 3, heads: int = 4, dim: int = 64,
              mlp_dim: int = 128):
    """torchvision's VisionTransformer on 28x28 (patch 4: 49 tokens + class token), the patch
    projection taking 1 channel; the head is initialised like the other linear layers (torchvision
    zero-initialises it)."""
    from torch import nn
    from torchvision.models import VisionTransformer

    m = VisionTransformer(image_size=28, patch_size=patch, num_layers=layers, num_heads=heads,
                          hidden_dim=dim, mlp_dim=mlp_dim, num_classes=num_classes)
    m.conv_proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
    nn.init.trunc_normal_(m.conv_proj.weight, std=(1.0 / (patch * patch)) ** 0.5)
    nn.init.zeros_(m.conv_proj.bias)
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


def torch_mlp(num_classes: int = 10, widths: tuple[int, ...] = MLP_WIDTHS):
    """Flatten, Linear 784 -> 256, ReLU, Linear 256 -> 128, ReLU, Linear 128 -> classes."""
    from torch import nn

    layers: list[nn.Module] = [nn.Flatten(1)]
    c = 28 * 28
    for w in widths:
        layers += [nn.Linear(c, w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.Linear(c, num_classes))


# ----------------------------------------------------------------------------- Keras

def keras_paper_cnn(num_classes: int = 10, widths: tuple[int, int, int] = PAPER_CNN_WIDTHS):
    """The paper's CNN (benchmarks/models/paper_models.py) in Keras, NHWC: conv 7x7 stride 2,
    max pool 3 stride 2, three blocks [conv 3x3, conv 3x3 stride 2, conv 3x3], global average
    pool, dense. 'same' padding (TensorFlow pads stride-2 layers asymmetrically where torch pads
    symmetrically; the output sizes agree: 14, 7, 4, 2, 1)."""
    import keras
    from keras import layers as L

    seq = [keras.Input((28, 28, 1)), L.Conv2D(widths[0], 7, strides=2, padding="same", activation="relu"),
           L.MaxPooling2D(3, strides=2, padding="same")]
    for w in widths:
        seq += [L.Conv2D(w, 3, padding="same", activation="relu"),
                L.Conv2D(w, 3, strides=2, padding="same", activation="relu"),
                L.Conv2D(w, 3, padding="same", activation="relu")]
    seq += [L.GlobalAveragePooling2D(), L.Dense(num_classes)]
    return keras.Sequential(seq, name="paper_cnn")


def keras_mlp(num_classes: int = 10, widths: tuple[int, ...] = MLP_WIDTHS):
    """The MLP in Keras (NHWC input; with one channel its flatten order equals torch's)."""
    import keras
    from keras import layers as L

    seq = [keras.Input((28, 28, 1)), L.Flatten()] + [L.Dense(w, activation="relu") for w in widths]
    return keras.Sequential(seq + [L.Dense(num_classes)], name="mlp")


def train_keras(model, x_train, y_train, x_test, y_test, epochs: int, seed: int = 42, log=print) -> dict:
    """The paper's recipe in Keras (AdamW lr 1e-3, weight decay 0.01, batch 128); x NCHW in [0, 1]."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t0 = time.perf_counter()
    hist = model.fit(x_train.transpose(0, 2, 3, 1), y_train, batch_size=128, epochs=epochs, verbose=0,
                     shuffle=True, callbacks=[keras.callbacks.LambdaCallback(
                         on_epoch_end=lambda e, logs: log(f"epoch={e + 1} loss={logs['loss']:.4f}"))])
    seconds = time.perf_counter() - t0
    xte = x_test.transpose(0, 2, 3, 1)
    pred = np.concatenate([np.asarray(model(xte[i:i + 500], training=False)).argmax(1)
                           for i in range(0, len(xte), 500)])
    return {"test_accuracy": float((pred == y_test).mean()), "train_seconds": round(seconds, 1),
            "train_loss": [float(v) for v in hist.history["loss"]]}


# ----------------------------------------------------------------------------- flax

def flax_module(kind: str, num_classes: int = 10):
    """The paper's CNN (``kind="paper_cnn"``) or the MLP (``"mlp"``) as a flax linen module (NHWC)."""
    import jax.numpy as jnp
    from flax import linen as nn

    class PaperCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(PAPER_CNN_WIDTHS[0], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)))(x))
            # jax2onnx 0.17.1 drops max_pool's padding argument (a VALID MaxPool, 6x6 instead of
            # 7x7); after a ReLU, zero padding gives the same maximum as -inf padding
            x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), window_shape=(3, 3), strides=(2, 2))
            for w in PAPER_CNN_WIDTHS:
                x = nn.relu(nn.Conv(w, (3, 3), padding=((1, 1), (1, 1)))(x))
                x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
                x = nn.relu(nn.Conv(w, (3, 3), padding=((1, 1), (1, 1)))(x))
            return nn.Dense(num_classes)(x.mean(axis=(1, 2)))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            for w in MLP_WIDTHS:
                x = nn.relu(nn.Dense(w)(x))
            return nn.Dense(num_classes)(x)

    if kind == "paper_cnn":
        return PaperCNN()
    if kind == "mlp":
        return MLP()
    raise ValueError(f"unknown flax model {kind!r}: 'paper_cnn' or 'mlp'")


def train_flax(module, x_train, y_train, x_test, y_test, epochs: int, seed: int = 42, log=print):
    """The paper's recipe in JAX/optax (AdamW lr 1e-3, weight decay 0.01, batch 128, the last
    partial batch dropped); x NCHW in [0, 1]. Returns (apply_fn, variables, log dict)."""
    import jax
    import jax.numpy as jnp
    import optax

    xtr = jnp.asarray(x_train.transpose(0, 2, 3, 1))
    ytr = jnp.asarray(y_train.astype(np.int32))
    variables = module.init(jax.random.PRNGKey(seed), xtr[:1])
    opt = optax.adamw(1e-3, weight_decay=0.01)
    state = opt.init(variables)

    def loss_fn(v, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply(v, xb), yb).mean()

    @jax.jit
    def step(v, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(v, xb, yb)
        upd, s = opt.update(g, s, v)
        return optax.apply_updates(v, upd), s, loss

    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.perf_counter()
    for e in range(epochs):
        perm = rng.permutation(len(xtr))
        total = []
        for i in range(0, len(perm) - 127, 128):
            idx = perm[i:i + 128]
            variables, state, loss = step(variables, state, xtr[idx], ytr[idx])
            total.append(float(loss))
        losses.append(float(np.mean(total)))
        log(f"epoch={e + 1} loss={losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    apply = jax.jit(module.apply)
    xte = x_test.transpose(0, 2, 3, 1)
    pred = np.concatenate([np.asarray(apply(variables, jnp.asarray(xte[i:i + 500]))).argmax(1)
                           for i in range(0, len(xte), 500)])
    return module.apply, variables, {"test_accuracy": float((pred == y_test).mean()),
                                     "train_seconds": round(seconds, 1), "train_loss": losses}


__all__ = ["torch_mobilenet", "torch_convnext", "torch_vit", "torch_mlp", "keras_paper_cnn", "keras_mlp",
           "train_keras", "flax_module", "train_flax", "MLP_WIDTHS", "PAPER_CNN_WIDTHS"]
