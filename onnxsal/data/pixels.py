"""One image's pixels: reading an image file (refused from its header when too large) and
bringing any array to float32 ``[H, W, C]`` in ``[0, 1]``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError

# one image's decoded pixels at most (an 8000x8000 photograph; 768 MB as float32 RGB): a few
# KB of PNG or TIFF can claim gigapixels. $ONNXSAL_MAX_PIXELS overrides it.
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm"}


class ImageFailure(Exception):
    """One image that cannot be used (the message says why); the others go on."""


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


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


def read_image_file(f: Path, name: str) -> np.ndarray:
    """The image file ``f`` as float32 HWC in [0, 1], or :class:`ImageFailure` saying why not."""
    if not f.is_file():
        raise ImageFailure("no such file")
    try:
        arr = _read_image(f)
    except InputError as exc:
        raise ImageFailure(str(exc)) from None
    except Exception as exc:
        raise ImageFailure(f"unreadable image ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    try:
        return _to_float_hwc(arr, name)
    except InputError as exc:
        raise ImageFailure(str(exc)) from None


def _to_float_hwc(arr: np.ndarray, name: str) -> np.ndarray:
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
