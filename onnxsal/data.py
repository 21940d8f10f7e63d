"""Images for explaining and benchmarking: folders, image files, ``.npz`` arrays, built-in sets.

Everything comes out as one :class:`Dataset`: float32 images ``[N, C, H, W]`` in ``[0, 1]``,
int64 labels (or ``None``), one name per image, a description of the source, the conversions
that were made (``notes``) and the images that could not be used (``failures``). Loading is
two steps: :func:`load_raw` reads images at their own size and channel count, and
:func:`conform` brings them to a model's input shape (resizing with
``skimage.transform.resize``, grey <-> RGB, alpha dropped), reporting each conversion.

A corrupt or unreadable image, or one holding NaN or Inf, is listed in ``failures`` and the
rest go on; only a data set with no usable image at all is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError

# one image's decoded pixels at most (an 8000x8000 photograph; 768 MB as float32 RGB): a few
# KB of PNG or TIFF can claim gigapixels. $ONNXSAL_MAX_PIXELS overrides it.
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm"}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
SKIMAGE_SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins"]
BUILTINS = ("fashion-mnist", "digits", "skimage-samples")


@dataclass
class RawImages:
    """Images as read, before any conversion: each ``[H, W, C]`` float32 in ``[0, 1]``."""

    images: list[np.ndarray]
    labels: np.ndarray | None
    names: list[str]
    source: str
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    """Images ready for a model: float32 ``[N, C, H, W]`` in ``[0, 1]``."""

    images: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    source: str
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, labels and names: identifies exactly this data."""
        h = hashlib.sha256()
        h.update(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        h.update("\n".join(self.names).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def subset(self, index: slice | np.ndarray) -> "Dataset":
        names = np.asarray(self.names, dtype=object)[index].tolist()
        return Dataset(self.images[index], None if self.labels is None else self.labels[index],
                       names, self.source, self.class_names, list(self.notes),
                       list(self.failures))

    def describe(self) -> dict:
        """A JSON-ready description (no pixels)."""
        return {
            "source": self.source,
            "count": len(self),
            "shape": list(self.shape),
            "labels": self.labels is not None,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint(),
            "notes": list(self.notes),
            "failures": [{"name": n, "error": e} for n, e in self.failures],
        }


# --------------------------------------------------------------------------------------------
# public entry points


def load_dataset(data: "str | os.PathLike | Sequence[str | os.PathLike] | RawImages | Dataset",
                 shape: Sequence[int | None] | None = None, limit: int | None = None,
                 split: str | None = None) -> Dataset:
    """Load ``data`` and bring it to ``shape`` = (C, H, W) (entries may be None: keep as read).

    ``data`` is a folder (one subfolder per class, or a flat folder without labels), an image
    file, a list of image files, an ``.npz`` file with ``x`` and optional ``y``, or a built-in
    name: ``fashion-mnist`` (``fashion-mnist:train`` for the training split), ``digits``,
    ``skimage-samples``.
    """
    if isinstance(data, Dataset):
        raw = RawImages([im.transpose(1, 2, 0) for im in data.images], data.labels,
                        list(data.names), data.source, data.class_names, list(data.notes),
                        list(data.failures))
        if limit is not None:
            raw = _limit(raw, limit)
    elif isinstance(data, RawImages):
        raw = _limit(data, limit) if limit is not None else data
    else:
        raw = load_raw(data, limit=limit, split=split)
    return conform(raw, shape)


def load_raw(data: "str | os.PathLike | Sequence[str | os.PathLike]", limit: int | None = None,
             split: str | None = None) -> RawImages:
    """Read images without converting them (see :func:`load_dataset` for what ``data`` is)."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise InputError(f"--limit must be a positive integer, got {limit!r}")
    if isinstance(data, (list, tuple)):
        if not data:
            raise InputError("no image files given")
        return _from_files([Path(p) for p in data], None, None, "files: " + ", ".join(
            str(p) for p in data[:3]) + (f", ... ({len(data)} files)" if len(data) > 3 else ""),
            limit)
    text = os.fspath(data)
    path = Path(text)
    if path.exists():
        if path.is_dir():
            return _from_folder(path, limit)
        if path.suffix.lower() == ".npz":
            return _from_npz(path, limit)
        return _from_files([path], None, None, f"file {path}", limit)
    name, _, sub = text.partition(":")
    sub = sub or split
    if name == "fashion-mnist":
        return load_fashion_mnist(split=sub or "test", limit=limit)
    if name == "digits":
        if sub:
            raise InputError(f"the digits data set has no splits (got '{sub}')")
        return load_digits(limit=limit)
    if name == "skimage-samples":
        if sub:
            raise InputError(f"skimage-samples has no splits (got '{sub}')")
        return load_skimage_samples(limit=limit)
    raise InputError(f"data '{text}': no such file or folder, and not a built-in data set "
                     f"(built-ins: {', '.join(BUILTINS)})")


def conform(raw: RawImages, shape: Sequence[int | None] | None = None) -> Dataset:
    """Convert every image to ``shape`` = (C, H, W); each kind of conversion becomes a note."""
    c_want, h_want, w_want = (list(shape) + [None] * 3)[:3] if shape is not None else (None,) * 3
    notes = list(raw.notes)
    failures = list(raw.failures)
    if c_want is None:
        chans = {im.shape[2] for im in raw.images}
        chans = {1 if c == 2 else 3 if c == 4 else c for c in chans}
        c_want = 3 if 3 in chans else 1
    if c_want not in (1, 3):
        raise InputError(f"cannot convert images to {c_want} channels (only 1 or 3)")
    counts: Counter = Counter()
    out, labels_keep, names = [], [], []
    converted = []
    for im in raw.images:
        im, what = _convert_channels(im, c_want)
        if what:
            counts[what] += 1
        converted.append(im)
    sizes = {im.shape[:2] for im in converted}
    if (h_want is None or w_want is None) and len(sizes) > 1:
        raise InputError(f"{raw.source}: the images have different sizes "
                         f"({', '.join(f'{h}x{w}' for h, w in sorted(sizes)[:4])}, ...) and the "
                         "model's input size is dynamic: give a fixed input size")
    for i, im in enumerate(converted):
        h0, w0 = im.shape[:2]
        h1 = h_want if h_want is not None else h0
        w1 = w_want if w_want is not None else w0
        if (h0, w0) != (h1, w1):
            im = _resize(im, (h1, w1))
            counts[f"resized from {h0}x{w0} to {h1}x{w1}"] += 1
        out.append(im.transpose(2, 0, 1))
        labels_keep.append(i)
        names.append(raw.names[i])
    for what, n in counts.items():
        notes.append(f"{n} image{'s' if n != 1 else ''} {what}")
    if not out:
        raise InputError(f"{raw.source}: no usable image"
                         + (f" ({len(failures)} failed: {failures[0][0]}: {failures[0][1]})"
                            if failures else ""))
    images = np.ascontiguousarray(np.stack(out).astype(np.float32, copy=False))
    labels = None if raw.labels is None else np.asarray(raw.labels, np.int64)[labels_keep]
    return Dataset(images, labels, names, raw.source, raw.class_names, notes, failures)


# --------------------------------------------------------------------------------------------
# built-in data sets


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


def load_fashion_mnist(split: str = "test", limit: int | None = None,
                       root: str | os.PathLike | None = None) -> RawImages:
    """Fashion-MNIST (28x28 grey, 10 classes) as images in [0, 1]; see :func:`fashion_mnist_arrays`."""
    x, y, root = fashion_mnist_arrays(split, root)
    stem = "train" if split == "train" else "t10k"
    n = len(x) if limit is None else min(limit, len(x))
    images = [x[i, :, :, None].astype(np.float32) / 255.0 for i in range(n)]
    return RawImages(images, y[:n], [f"{stem}[{i}]" for i in range(n)],
                     f"fashion-mnist ({split} split, {root})", list(FASHION_MNIST_CLASSES))


def load_digits(limit: int | None = None) -> RawImages:
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
    n = len(x) if limit is None else min(limit, len(x))
    images = [(x[i, :, :, None] / 16.0).astype(np.float32) for i in range(n)]
    return RawImages(images, y[:n], [f"digits[{i}]" for i in range(n)],
                     "digits (scikit-learn, 8x8)", [str(i) for i in range(10)])


def load_skimage_samples(limit: int | None = None) -> RawImages:
    """A few real photographs shipped inside scikit-image (no labels; various sizes)."""
    from skimage import data as skdata

    names = SKIMAGE_SAMPLES if limit is None else SKIMAGE_SAMPLES[:limit]
    images, failures = [], []
    ok_names = []
    for name in names:
        try:
            arr = getattr(skdata, name)()
            images.append(_to_float_hwc(arr, name))
            ok_names.append(name)
        except Exception as exc:  # a sample that needs a download on this machine
            failures.append((name, f"{type(exc).__name__}: {exc}"))
    return RawImages(images, None, ok_names, "skimage-samples (scikit-image photographs)",
                     None, [], failures)


# --------------------------------------------------------------------------------------------
# files, folders, arrays


def _limit(raw: RawImages, limit: int | None) -> RawImages:
    if limit is None:
        return raw
    return RawImages(raw.images[:limit], None if raw.labels is None else raw.labels[:limit],
                     raw.names[:limit], raw.source, raw.class_names, list(raw.notes),
                     list(raw.failures))


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _from_folder(root: Path, limit: int | None) -> RawImages:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    notes = []
    if subdirs:
        class_names = [d.name for d in subdirs]
        files, labels = [], []
        for k, d in enumerate(subdirs):
            for f in sorted(p for p in d.rglob("*") if _is_image(p)):
                files.append(f)
                labels.append(k)
        loose = [p for p in entries if _is_image(p)]
        if loose:
            notes.append(f"{len(loose)} image files directly in {root} ignored (class folders "
                         "are used)")
        if not files:
            raise InputError(f"folder {root}: no image files in its subfolders")
        raw = _from_files(files, np.asarray(labels, np.int64), class_names,
                          f"folder {root} ({len(class_names)} classes)", limit, root)
    else:
        files = [p for p in entries if _is_image(p)]
        if not files:
            raise InputError(f"folder {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        raw = _from_files(files, None, None, f"folder {root} (no labels)", limit, root)
    raw.notes[:0] = notes
    return raw


def max_pixels() -> int:
    """The cap on one image's decoded pixels: ``$ONNXSAL_MAX_PIXELS`` or MAX_PIXELS."""
    text = os.environ.get("ONNXSAL_MAX_PIXELS", "").strip()
    if not text:
        return MAX_PIXELS
    try:
        cap = int(float(text))
    except ValueError:
        cap = 0
    if cap < 1:
        raise InputError(f"ONNXSAL_MAX_PIXELS='{text}' is not a positive number of pixels")
    return cap


def _read_image(path: Path) -> np.ndarray:
    """One image file's first frame, refused from its header (before anything is decoded)
    when it holds more than max_pixels() pixels: a small file can decode to gigabytes."""
    import warnings

    import imageio.v3 as iio
    from PIL import Image

    cap = max_pixels()
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check (a warning, then a bare error): ours governs
    try:
        with Image.open(path) as im:
            w, h = im.size
        if w * h > cap:
            raise InputError(f"{w}x{h} pixels ({w * h / 1e6:.0f} megapixels) exceed the {cap / 1e6:g}-"
                             "megapixel cap on one image (ONNXSAL_MAX_PIXELS): not decoded")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # imageio's plugin probing on unreadable files
            arr = iio.imread(path, index=0)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if arr.ndim == 4:  # some plugins keep a frame axis
        arr = arr[0]
    return arr


def _from_files(files: list[Path], labels: np.ndarray | None, class_names: list[str] | None,
                source: str, limit: int | None, root: Path | None = None) -> RawImages:
    images, names, keep, failures = [], [], [], []
    for i, f in enumerate(files):
        if limit is not None and len(images) >= limit:
            break
        name = str(f.relative_to(root)) if root is not None else str(f)
        if not f.is_file():
            failures.append((name, "no such file"))
            continue
        try:
            arr = _read_image(f)
        except InputError as exc:
            failures.append((name, str(exc)))
            continue
        except Exception as exc:
            failures.append((name, f"unreadable image ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"))
            continue
        try:
            images.append(_to_float_hwc(arr, name))
        except InputError as exc:
            failures.append((name, str(exc)))
            continue
        names.append(name)
        keep.append(i)
    labels = None if labels is None else labels[keep]
    return RawImages(images, labels, names, source, class_names, [], failures)


def _to_float_hwc(arr: np.ndarray, name: str, layout: str = "HWC") -> np.ndarray:
    """One image (HW or HWC; uint8/uint16/bool/float) -> float32 HWC in [0, 1]."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"{name}: an image must be 2-D or 3-D, got shape {arr.shape}")
    if arr.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{name}: {arr.shape[2]} channels (expected 1 to 4), shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name}: empty image (shape {arr.shape})")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint16 or (arr.size and arr.max() > 255):
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise InputError(f"{name}: integer pixel values outside 0..65535")
            return (arr.astype(np.float32) / 65535.0)
        if arr.size and arr.min() < 0:
            raise InputError(f"{name}: negative integer pixel values")
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            what = "NaN" if np.isnan(arr).any() else "Inf"
            raise InputError(f"{name}: contains {what} ({int(bad.sum())} values)")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(f"{name}: float pixel values must lie in [0, 1], found "
                             f"{lo:.4g}..{hi:.4g} (scale 0..255 data by 1/255)")
        return np.clip(arr, 0.0, 1.0)
    raise InputError(f"{name}: unsupported pixel type {arr.dtype}")


def _npz_layout(x: np.ndarray, where: str) -> np.ndarray:
    """x as N,H,W,C from N,H,W / N,H,W,C / N,C,H,W."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise InputError(f"{where}: 'x' must be N,H,W or N,H,W,C or N,C,H,W; got shape {x.shape}")
    chan = (1, 2, 3, 4)
    if x.shape[3] in chan:
        return x
    if x.shape[1] in chan:
        return x.transpose(0, 2, 3, 1)
    raise InputError(f"{where}: cannot tell the channel axis of 'x' with shape {x.shape} "
                     "(1 to 4 channels, first or last)")


def _from_npz(path: Path, limit: int | None) -> RawImages:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "x" not in keys:
                raise InputError(f"{path}: no array 'x' (found: {', '.join(sorted(keys)) or 'none'})")
            x = z["x"]
            y = z["y"] if "y" in keys else None
            names = z["names"] if "names" in keys else None
            classes = z["class_names"] if "class_names" in keys else None
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"{path}: cannot read without unpickling ({exc}); store plain "
                         "numeric arrays") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    x = _npz_layout(x, str(path))
    n = len(x)
    if n == 0:
        raise InputError(f"{path}: 'x' holds no images (shape {x.shape})")
    if x.dtype == np.bool_:
        x = x.astype(np.float32)
    elif np.issubdtype(x.dtype, np.integer):
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0:
            raise InputError(f"{path}: 'x' holds negative integer pixel values")
        if hi <= 255:
            x = x.astype(np.float32) / np.float32(255.0)
        elif x.dtype == np.uint16:
            x = x.astype(np.float32) / np.float32(65535.0)
        else:
            raise InputError(f"{path}: integer 'x' must hold 0..255 (found up to {hi})")
    elif np.issubdtype(x.dtype, np.floating):
        fin = x[np.isfinite(x)]
        if fin.size and (fin.min() < -1e-6 or fin.max() > 1.0 + 1e-6):
            raise InputError(f"{path}: float 'x' must lie in [0, 1], found {fin.min():.4g}.."
                             f"{fin.max():.4g} (store uint8 0..255, or divide by 255)")
    else:
        raise InputError(f"{path}: unsupported pixel type {x.dtype} for 'x'")
    notes = []
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[0] == n:
            y = y.argmax(axis=1)
            notes.append("labels 'y' given one-hot: taken as the argmax")
        if y.ndim != 1 or len(y) != n:
            raise InputError(f"{path}: 'y' has shape {y.shape}, expected ({n},) to match 'x'")
        if not (np.issubdtype(y.dtype, np.integer) or
                (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
            raise InputError(f"{path}: 'y' must hold integer class indices, got {y.dtype}")
        if n and y.min() < 0:
            raise InputError(f"{path}: 'y' holds negative class indices")
        y = y.astype(np.int64)
    if names is not None and len(names) == n:
        names = [str(s) for s in names]
    else:
        names = [f"x[{i}]" for i in range(n)]
    count = n if limit is None else min(limit, n)
    images, keep, failures = [], [], []
    for i in range(n):
        if len(images) >= count:
            break
        try:
            images.append(_to_float_hwc(x[i], names[i]))
            keep.append(i)
        except InputError as exc:
            failures.append((names[i], str(exc).split(": ", 1)[-1]))
    return RawImages(images, None if y is None else y[keep], [names[i] for i in keep],
                     f"npz {path}", [str(c) for c in classes] if classes is not None else None,
                     notes, failures)


# --------------------------------------------------------------------------------------------
# conversions


def _convert_channels(im: np.ndarray, c_want: int) -> tuple[np.ndarray, str]:
    c = im.shape[2]
    what = []
    if c in (2, 4):
        im = im[:, :, : c - 1]
        c -= 1
        what.append("alpha channel dropped")
    if c == c_want:
        return im, ", ".join(what)
    if c == 1 and c_want == 3:
        return np.repeat(im, 3, axis=2), ", ".join(what + ["grey converted to RGB"])
    if c == 3 and c_want == 1:
        from skimage.color import rgb2gray

        g = rgb2gray(im).astype(np.float32)[:, :, None]
        return g, ", ".join(what + ["RGB converted to grey (luminance)"])
    raise InputError(f"cannot convert {c} channels to {c_want}")  # pragma: no cover


def _resize(im: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with anti-aliasing. A large reduction first averages blocks of whole
    factors (a box filter, cheap), so that skimage's Gaussian anti-aliasing that follows has
    a small kernel instead of one as wide as the reduction over the full-size image."""
    from skimage.measure import block_reduce
    from skimage.transform import resize

    kh, kw = max(1, im.shape[0] // hw[0]), max(1, im.shape[1] // hw[1])
    if kh > 1 or kw > 1:
        h, w = im.shape[0] // kh * kh, im.shape[1] // kw * kw
        top, left = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2  # the crop is < one block
        im = block_reduce(im[top:top + h, left:left + w], (kh, kw, 1), np.mean, func_kwargs={"dtype": np.float64})
    out = resize(im, (hw[0], hw[1], im.shape[2]), order=1, mode="reflect",
                 anti_aliasing=(hw[0] < im.shape[0] or hw[1] < im.shape[1]),
                 preserve_range=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def iter_batches(n: int, size: int) -> Iterable[slice]:
    """Slices covering range(n) in steps of ``size``."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))
