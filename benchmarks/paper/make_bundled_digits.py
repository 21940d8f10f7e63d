"""Build the bundled real test model and sample: tests/data/digits_cnn.onnx and digits_sample.npz.

Data: OpenCV's handwritten digits (5000 20x20 grey images, 500 per class), from the Debian
package opencv-doc (docs/data.md#data-sets):

    apt-get download opencv-doc
    dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/digits.png
    python benchmarks/paper/make_bundled_digits.py --png ./usr/share/doc/opencv-doc/examples/data/digits.png

Split (seed 0): 400 train / 100 test images per class. Model: the paper's CNN (docs/definitions.md#paper-models)
at half width (16, 32, 64) with one input channel, trained with the paper's recipe (AdamW lr 1e-3,
weight decay 0.01, batch 128, seed 42, pixels in [0, 1]) for --epochs epochs; exported with the
legacy torch exporter at opset 17 with preprocessing "none" and labels "0".."9".
The sample holds the first 20 test images of each class (200), x uint8 [200, 1, 20, 20], y int64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.models.paper_models import paper_cnn  # noqa: E402
from benchmarks.models.training import evaluate, train  # noqa: E402

DEFAULT_PNG = "/usr/share/doc/opencv-doc/examples/data/digits.png"


def load_opencv_digits(png: str) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 [5000, 20, 20], y int64 [5000]) from OpenCV's digits.png."""
    from skimage.io import imread

    im = imread(png)
    if im.ndim == 3:
        im = im[..., 0]
    if im.shape != (1000, 2000):
        raise SystemExit(f"{png}: expected a 1000x2000 grey image, got {im.shape}")
    x = im.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    return x.astype(np.uint8), np.repeat(np.arange(10), 500).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", default=DEFAULT_PNG)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"))
    args = ap.parse_args()
    import torch

    from converters.torch_export import export, parity

    x, y = load_opencv_digits(args.png)
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx += list(idx[:400])
        test_idx += list(idx[400:])
    train_idx, test_idx = np.array(train_idx), np.array(test_idx)
    xf = (x.astype(np.float32) / 255.0)[:, None]
    xtr, ytr, xte, yte = xf[train_idx], y[train_idx], xf[test_idx], y[test_idx]

    torch.manual_seed(42)
    model = paper_cnn(10, in_channels=1, widths=(16, 32, 64))
    res = train(model, xtr, ytr, xte, yte, epochs=args.epochs, threads=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [str(i) for i in range(10)]
    onnx_path = out / "digits_cnn.onnx"
    export(model, (1, 20, 20), onnx_path, opset=17, dynamo=False, preprocess="none", labels=labels)
    p = parity(model, onnx_path, xte)

    # sample: first 20 test images of every class, in test-split order
    sample = np.concatenate([test_idx[yte == c][:20] for c in range(10)])
    np.savez_compressed(out / "digits_sample.npz", x=x[sample][:, None], y=y[sample],
                        class_names=np.array(labels))
    xs = xf[sample]
    sample_acc = evaluate(model, xs, y[sample])
    info = {"test_images": int(len(xte)), "train_images": int(len(xtr)), "epochs": args.epochs,
            "train_seconds": round(res.seconds, 1), "torch_test_accuracy": res.test_accuracy,
            "sample_accuracy": sample_acc, "parity_test_split": p,
            "onnx_bytes": onnx_path.stat().st_size,
            "sample_bytes": (out / "digits_sample.npz").stat().st_size}
    (out / "digits_cnn.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
