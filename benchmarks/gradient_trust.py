"""How well the finite-difference check of a file's own gradient (onnxsal.trust.fd_errors)
separates a correct gradient from tampered ones, on small torchvision models (random weights):
max rel err along the gradient / across random directions, and the time of one check.

    python benchmarks/gradient_trust.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def models():
    import torch
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.5)  # torchvision zeroes the head
    nn = torch.nn
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    return {"small CNN 16 px": (cnn, (3, 16, 16)),
            "ResNet-18 64 px": (torchvision.models.resnet18(num_classes=100), (3, 64, 64)),
            "ResNet-18 224 px": (torchvision.models.resnet18(num_classes=1000), (3, 224, 224)),
            "MobileNetV3-S 64 px": (torchvision.models.mobilenet_v3_small(num_classes=100), (3, 64, 64)),
            "ViT 32 px": (vit, (3, 32, 32))}


def tampered(g: np.ndarray) -> dict[str, np.ndarray]:
    half = np.arange(g.shape[-1]) < g.shape[-1] // 2
    return {"correct": g, "x 1.05": g * 1.05, "zeroed": 0 * g, "other class": g[[1, 0, 2, 3, 4]],
            "half zeroed": np.where(half, g, 0).astype(np.float32)}


def main() -> None:
    import torch

    from onnxsal import trust
    from onnxsal.engine import Engine

    from conftest import export_torch

    for name, (module, shape) in models().items():
        eng = Engine(export_torch(module.eval(), torch.randn(2, *shape)), device="cpu",
                     use_disk_cache=False, threads=1)
        x, seeds, _ = trust.probe(eng.model_hash, 2, eng.input_shape, eng.num_classes, eng.predict)
        g = eng.vjp(x, seeds).grads[eng.input_name]
        cells, t0 = [], time.perf_counter()
        for what, gg in tampered(g).items():
            along, across = trust.fd_errors(gg, x, seeds, eng.logits, np.random.default_rng(5))
            cells.append(f"{what} {along:.1e} / {across:.1e}")
        seconds = (time.perf_counter() - t0) / len(cells)
        print(f"{name}: " + "; ".join(cells) + f"; {seconds:.2f} s per check", flush=True)


if __name__ == "__main__":
    main()
