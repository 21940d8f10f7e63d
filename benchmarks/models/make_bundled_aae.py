"""Train the bundled adversarial autoencoders for ABELE (docs/abele.md#bundled-autoencoders).

digits: OpenCV's handwritten digits (the data of tests/data/digits_cnn.onnx; docs/data.md),
the same seed-0 split as benchmarks/paper/make_bundled_digits.py, the 4000 training images
only (the 200 bundled sample images are test images, never seen):

    python benchmarks/models/make_bundled_aae.py digits --png .../digits.png --out tests/data/aae_digits

fashion: the Fashion-MNIST training split (60000 images, 28x28):

    python benchmarks/models/make_bundled_aae.py fashion --out tests/data/aae_fashion --max-minutes 12

Both train on one CPU thread (converters.autoencoder.train_autoencoder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.paper.make_bundled_digits import DEFAULT_PNG, load_opencv_digits  # noqa: E402
from converters.autoencoder import train_autoencoder  # noqa: E402


def digits_train(png: str) -> np.ndarray:
    """The 4000 training images of the bundled digits model's split, float32 [N, 1, 20, 20]."""
    x, y = load_opencv_digits(png)
    rng = np.random.default_rng(0)
    train_idx = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx += list(idx[:400])
    return (x[np.array(train_idx)].astype(np.float32) / 255.0)[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["digits", "fashion"])
    ap.add_argument("--png", default=DEFAULT_PNG)
    ap.add_argument("--out", required=True)
    ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None, help="Stop after the epoch that passes this.")
    args = ap.parse_args()
    if args.which == "digits":
        x, source = digits_train(args.png), "OpenCV digits.png, training split (seed 0, 400 per class)"
        latent, epochs = args.latent or 4, args.epochs or 200
    else:
        from onnxsal.data import fashion_mnist_arrays

        xr, _, _ = fashion_mnist_arrays("train")
        x = (xr.astype(np.float32) / 255.0)[:, None]
        source, latent, epochs = "Fashion-MNIST training split", args.latent or 8, args.epochs or 15
    if args.limit:
        x = x[:args.limit]
    rec = train_autoencoder(x, args.out, latent=latent, epochs=epochs, seed=0, threads=1,
                            source=source, log=lambda s: print(s, flush=True),
                            max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
