"""A CPU-friendly training helper with the paper's recipe (docs/definitions.md#paper-models).

AdamW (lr 1e-3, weight decay 0.01), cross-entropy, batch 128, seed 42, pixels in [0, 1],
no normalisation and no augmentation; the model after the last epoch is evaluated.
Also: the offline data sets this project trains on (docs/data.md#data-sets), loaded as float32 NCHW in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def load_fashion_mnist_nchw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST (read by :func:`onnxsal.data.fashion_mnist_arrays`) for training:
    (x_train [60000,1,28,28], y_train, x_test [10000,1,28,28], y_test), x float32 in [0, 1]."""
    from onnxsal.data import fashion_mnist_arrays

    (xtr, ytr, _), (xte, yte, _) = fashion_mnist_arrays("train"), fashion_mnist_arrays("test")
    return (xtr[:, None].astype(np.float32) / 255.0, ytr, xte[:, None].astype(np.float32) / 255.0, yte)


def load_sklearn_digits(size: int = 16, test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 1797 8x8 digits, upsampled (bilinear) to ``size`` x ``size``, in [0, 1]:
    (x_train, y_train, x_test, y_test), x float32 [N, 1, size, size]; a stratified split."""
    from skimage.transform import resize
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    if size != 8:
        x = np.stack([resize(im, (size, size), order=1, anti_aliasing=False) for im in x]).astype(np.float32)
    x = np.clip(x, 0.0, 1.0)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


@dataclass
class TrainResult:
    test_accuracy: float
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of a torch model on numpy arrays."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = model(torch.from_numpy(x[i:i + batch_size]))
            correct += int((out.argmax(1).numpy() == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def train(model, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          epochs: int = 50, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 128,
          seed: int = 42, threads: int | None = 1, log=print, eval_every_epoch: bool = False) -> TrainResult:
    """Train ``model`` in place with the paper's recipe; return the last epoch's test accuracy.

    x arrays are float32 NCHW in [0, 1] (used as they are), y int64 class indices.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        te = time.perf_counter()
        perm = torch.randperm(len(xt), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        rec = {"epoch": epoch, "train_loss": total / n, "seconds": time.perf_counter() - te}
        if eval_every_epoch or epoch == epochs:
            rec["test_accuracy"] = evaluate(model, x_test, y_test)
        history.append(rec)
        if log:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    model.eval()
    return TrainResult(test_accuracy=history[-1]["test_accuracy"] if history else evaluate(model, x_test, y_test),
                       epochs=epochs, seconds=time.perf_counter() - t0, history=history)


def save_state(model, path: str | Path) -> None:
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), str(path))


def load_state(model, path: str | Path):
    """Load a state dict saved by :func:`save_state` (tensors only: ``weights_only=True``)."""
    import torch

    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return model.eval()


__all__ = ["load_fashion_mnist_nchw", "load_sklearn_digits", "TrainResult", "evaluate",
           "train", "save_state", "load_state"]
