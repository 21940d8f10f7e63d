"""Bringing images to a model's input shape: channels (grey <-> RGB, alpha dropped) and size
(bilinear with anti-aliasing), each kind of conversion counted as a note."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..errors import InputError
from .types import Dataset, RawImages


def want_shape(shape: Sequence[int | None] | None) -> tuple[int | None, int | None, int | None]:
    """(C, H, W) asked for; None entries: keep as read."""
    c, h, w = (list(shape) + [None] * 3)[:3] if shape is not None else (None,) * 3
    return c, h, w


def channels_as_read(c: int) -> int:
    """The channel count an image of ``c`` channels has once its alpha is dropped."""
    return 1 if c == 2 else 3 if c == 4 else c


def conform(raw: RawImages, shape: Sequence[int | None] | None = None) -> Dataset:
    """Convert every image to ``shape`` = (C, H, W); each kind of conversion becomes a note."""
    c_want, h_want, w_want = want_shape(shape)
    notes = list(raw.notes)
    failures = list(raw.failures)
    if c_want is None:
        chans = {channels_as_read(im.shape[2]) for im in raw.images}
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


class Conformer:
    """:func:`conform` one image at a time, with the channel count and size fixed beforehand
    (what streaming needs: the same pixels as :func:`conform` gives for the whole set)."""

    def __init__(self, c: int, hw: tuple[int, int]) -> None:
        if c not in (1, 3):
            raise InputError(f"cannot convert images to {c} channels (only 1 or 3)")
        self.c, self.hw = c, (int(hw[0]), int(hw[1]))
        self.channel_counts: Counter = Counter()
        self.resize_counts: Counter = Counter()

    def __call__(self, im: np.ndarray) -> np.ndarray:
        """One HWC image -> float32 CHW."""
        im, what = _convert_channels(im, self.c)
        if what:
            self.channel_counts[what] += 1
        h0, w0 = im.shape[:2]
        if (h0, w0) != self.hw:
            im = _resize(im, self.hw)
            self.resize_counts[f"resized from {h0}x{w0} to {self.hw[0]}x{self.hw[1]}"] += 1
        return np.ascontiguousarray(im.transpose(2, 0, 1), dtype=np.float32)

    def notes(self) -> list[str]:
        """The conversion notes, in :func:`conform`'s order (channels, then sizes)."""
        counts = list(self.channel_counts.items()) + list(self.resize_counts.items())
        return [f"{n} image{'s' if n != 1 else ''} {what}" for what, n in counts]


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
