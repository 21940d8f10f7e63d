"""The report's pictures as PNG bytes: images, saliency overlays, boxes, and data URIs.

Overlays are composed with numpy (no figure per thumbnail): the map's colour (diverging and
centred at 0 for signed maps, red supporting the class and blue opposing it; sequential for
magnitudes) is blended over a greyscale copy of the image with an opacity that grows with the
attribution, the colour range ending at the 99.5th percentile of the magnitude, as in
:mod:`onnxsal.overlays`. Small images are enlarged by pixel repetition so that they stay sharp.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from ..overlays import DIVERGING, SEQUENTIAL, _robust_max

MIN_SIDE = 96  # images are enlarged by an integer factor to at least this many pixels
MAX_SIDE = 192  # and larger ones reduced to at most this many


def _zoom(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    k = max(1, -(-MIN_SIDE // max(1, min(h, w))))
    return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1) if k > 1 else rgb


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB (or RGBA) float array in [0, 1], [H, W, 3|4]."""
    from PIL import Image

    arr = (np.clip(np.nan_to_num(rgb), 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_rgb(image: np.ndarray) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3]."""
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    if img.shape[0] >= 3:
        return np.transpose(img[:3], (1, 2, 0))
    return np.repeat(img[0][:, :, None], 3, axis=2)


def overlay_rgb(image: np.ndarray, saliency: np.ndarray, signed: bool) -> np.ndarray:
    """The map over a greyscale copy of the image, [H, W, 3]."""
    import matplotlib

    m = np.nan_to_num(np.asarray(saliency, np.float32))
    grey = np.clip(np.asarray(image, np.float32), 0, 1).mean(axis=0)
    if signed:
        lim = _robust_max(np.abs(m))
        value = np.clip(m / lim, -1, 1) * 0.5 + 0.5
        strength = np.clip(np.abs(m) / lim, 0, 1)
        cmap = matplotlib.colormaps[DIVERGING]
    else:
        lo = float(m.min())
        hi = lo + _robust_max(m - lo)
        value = strength = np.clip((m - lo) / (hi - lo), 0, 1)
        cmap = matplotlib.colormaps[SEQUENTIAL]
    colour = cmap(value)[..., :3]
    alpha = (0.2 + 0.8 * strength)[..., None]
    return alpha * colour + (1 - alpha) * grey[..., None]


def draw_box(rgb: np.ndarray, box, colour=(1.0, 0.85, 0.0)) -> np.ndarray:
    """A copy of [H, W, 3] with the outline of box [y0, x0, y1, x1] (end exclusive)."""
    out = np.array(rgb, np.float32, copy=True)
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = out.shape[:2]
    y0, x0 = max(0, min(h - 1, y0)), max(0, min(w - 1, x0))
    y1, x1 = max(y0 + 1, min(h, y1)), max(x0 + 1, min(w, x1))
    c = np.asarray(colour, np.float32)
    out[y0, x0:x1] = c
    out[y1 - 1, x0:x1] = c
    out[y0:y1, x0] = c
    out[y0:y1, x1 - 1] = c
    return out


def _shrink(rgb: np.ndarray) -> np.ndarray:
    """Large pictures (photographs) reduced to at most MAX_SIDE pixels a side, so that a report
    of many images stays a few MB."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = MAX_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray((np.clip(np.nan_to_num(rgb), 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.BOX), np.float32) / 255


def thumb(rgb: np.ndarray, box=None) -> bytes:
    """PNG of an [H, W, 3] picture, small ones enlarged and large ones reduced, with an
    optional box outline [y0, x0, y1, x1] (drawn after the resizing, so a one-pixel box stays
    visible)."""
    h = rgb.shape[0]
    if max(rgb.shape[:2]) > MAX_SIDE:
        out = _shrink(rgb)
        scale = out.shape[0] / h
        if box is not None:
            b = [int(v * scale) for v in box[:2]] + [max(1, round(v * scale)) for v in box[2:]]
            out = draw_box(out, b)
        return png(out)
    big = _zoom(rgb)
    if box is not None:
        k = big.shape[0] // max(1, h)
        big = draw_box(big, [int(v) * k for v in box])
    return png(big)


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """A 2-D array as a sequential colour picture (its own min..max), [H, W, 3]."""
    import matplotlib

    v = np.nan_to_num(np.asarray(values, np.float64))
    lo, hi = float(v.min()), float(v.max())
    return matplotlib.colormaps[SEQUENTIAL]((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v))[..., :3]
