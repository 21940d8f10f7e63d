"""The built-in data sets: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), scikit-learn's
digits and scikit-image's sample photographs, each as a lazy source.

Fashion-MNIST and the digits are small compact arrays (the Fashion-MNIST test split is 7.8 MB
of uint8, the training split 47 MB): the source holds that array and converts a row to float
only when it is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError
from .sources import ArraySource, CallSource
from .types import RawImages

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
SKIMAGE_SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins"]
BUILTINS = ("fashion-mnist", "digits", "skimage-samples")


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip or plain, checking its header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim != expect_dims:
        raise InputError(f"{path}: expected {expect_dims} dimensions, the header says {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path} is truncated (no complete header)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise InputError(f"{path} holds {len(raw) - header} bytes of data, the header "
                         f"announces {count} ({'x'.join(map(str, dims))}): truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def fashion_mnist_arrays(split: str = "test", root: str | os.PathLike | None = None
                         ) -> tuple[np.ndarray, np.ndarray, Path]:
    """Fashion-MNIST ``split`` as arrays (images [N, 28, 28] uint8, labels [N] int64) and the
    folder read, from the Debian package ``dataset-fashion-mnist``. ``root`` defaults to
    ``$ONNXSAL_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``."""
    if split not in ("train", "test"):
        raise InputError(f"fashion-mnist split must be 'train' or 'test', got '{split}'")
    root = Path(root or os.environ.get("ONNXSAL_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    stem = "train" if split == "train" else "t10k"
    files = {}
    for kind, suffix in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        cands = [root / f"{stem}-{suffix}.gz", root / f"{stem}-{suffix}"]
        found = next((p for p in cands if p.is_file()), None)
        if found is None:
            raise InputError(f"Fashion-MNIST is not installed ({cands[0]} not found): install it "
                             "with `apt-get install dataset-fashion-mnist`")
        files[kind] = found
    x = _read_idx(files["images"], 3)
    y = _read_idx(files["labels"], 1)
    if len(x) != len(y):
        raise InputError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels")
    return x, y.astype(np.int64), root


def fashion_mnist_source(split: str = "test", root: str | os.PathLike | None = None) -> ArraySource:
    """Fashion-MNIST ``split`` (28x28 grey, 10 classes) as a source; see :func:`fashion_mnist_arrays`."""
    x, y, root = fashion_mnist_arrays(split, root)
    stem = "train" if split == "train" else "t10k"
    return ArraySource(x, y, [f"{stem}[{i}]" for i in range(len(x))],
                       f"fashion-mnist ({split} split, {root})", list(FASHION_MNIST_CLASSES), 255.0)


def load_fashion_mnist(split: str = "test", limit: int | None = None,
                       root: str | os.PathLike | None = None) -> RawImages:
    """Fashion-MNIST (28x28 grey, 10 classes) as images in [0, 1]; see :func:`fashion_mnist_arrays`."""
    return fashion_mnist_source(split, root).raw(limit)


def digits_source() -> ArraySource:
    """scikit-learn's 1797 handwritten digits (8x8 grey, values 0..16 scaled to [0, 1])."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the 'digits' data set ships inside scikit-learn, which is not "
                         "installed: `pip install scikit-learn`")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        with gzip.open(csv, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.float64)
        x, y = arr[:, :-1].reshape(-1, 8, 8), arr[:, -1].astype(np.int64)
    else:  # pragma: no cover - a future scikit-learn that moves the file
        from sklearn.datasets import load_digits as _ld

        d = _ld()
        x, y = d.images, d.target.astype(np.int64)
    return ArraySource(x, y, [f"digits[{i}]" for i in range(len(x))],
                       "digits (scikit-learn, 8x8)", [str(i) for i in range(10)], 16.0)


def load_digits(limit: int | None = None) -> RawImages:
    """scikit-learn's 1797 handwritten digits (8x8 grey, values 0..16 scaled to [0, 1])."""
    return digits_source().raw(limit)


def skimage_source(limit: int | None = None) -> CallSource:
    """A few real photographs shipped inside scikit-image (no labels; various sizes)."""
    names = SKIMAGE_SAMPLES if limit is None else SKIMAGE_SAMPLES[:limit]
    return CallSource(list(names), "skimage-samples (scikit-image photographs)")


def load_skimage_samples(limit: int | None = None) -> RawImages:
    """A few real photographs shipped inside scikit-image (no labels; various sizes)."""
    src = skimage_source(limit)
    return src.raw(None)
