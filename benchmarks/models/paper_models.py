"""The paper's two classifiers (docs/definitions.md#paper-models): a small CNN and a from-scratch ResNet-18.

Both take images with pixels in [0, 1] (no mean/std normalisation) in NCHW layout.
``in_channels`` lets them take grey images directly (Fashion-MNIST, digits: ``in_channels=1``);
the paper used RGB (3). We build single-channel models for grey data instead of replicating the
grey channel three times: the model then sees exactly the data's pixels, the ONNX input is
[N, 1, H, W] and a saliency map needs no channel reduction over copies of one channel.
"""

from __future__ import annotations


def paper_cnn(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (32, 64, 128)):
    """The paper's CNN.

    Conv(in->w0, k7, s2, p3)+ReLU, MaxPool(k3, s2, p1), then three blocks of widths ``widths``
    each [Conv3x3 p1+ReLU, Conv3x3 s2 p1+ReLU, Conv3x3 p1+ReLU], global average pooling and
    Linear(widths[-1] -> classes). No batch norm, no dropout. ``widths`` other than
    (32, 64, 128) give a narrower copy for small test models (the stem has widths[0] channels).
    """
    from torch import nn

    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3), nn.ReLU(),
                               nn.MaxPool2d(3, stride=2, padding=1)]
    c = widths[0]
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
                   nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def paper_resnet18(num_classes: int = 10, in_channels: int = 3):
    """torchvision's ImageNet ResNet-18 (7x7 stride-2 stem and max pool kept), random init,
    final layer Linear(512 -> classes); the stem convolution takes ``in_channels`` channels."""
    from torch import nn
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    return m


def build(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs):
    """``build("cnn" | "resnet18", ...)``."""
    name = name.lower()
    if name == "cnn":
        return paper_cnn(num_classes, in_channels, **kwargs)
    if name == "resnet18":
        return paper_resnet18(num_classes, in_channels)
    raise ValueError(f"unknown paper model {name!r}: use 'cnn' or 'resnet18'")


__all__ = ["paper_cnn", "paper_resnet18", "build"]
