"""Ground-truth masks for the localisation metrics (docs/metrics.md#ground-truth-masks).

:func:`load_masks` returns bool [N, H, W] (True: inside the object), one mask per image name,
from a folder of mask images named like the images (any image suffix; nonzero = inside), an
``.npz`` array (``file.npz`` with one array or a ``masks`` key, or ``file.npz:KEY``; [N, H, W]
in the order of ``names``), or a CSV of boxes ``name,x0,y0,x1,y1`` (pixels of the [H, W]
shape, x1/y1 exclusive as in a slice; several rows of one name are united; a header row is
allowed). Mask images and arrays of another size are resized to ``shape`` by nearest
neighbour, so a mask stays a set of pixels.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError


def load_masks(source: "str | os.PathLike", names: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
    """bool [len(names), H, W] masks for the images ``names`` (file names or stems)."""
    text = str(source)
    h, w = int(shape[0]), int(shape[1])
    path = Path(text)
    if path.is_dir():
        return _from_folder(path, names, (h, w))
    if path.suffix.lower() == ".csv":
        return _from_boxes(path, names, (h, w))
    key = None
    if not path.exists() and ".npz:" in text:
        head, key = text.rsplit(":", 1)
        path = Path(head)
    if path.suffix.lower() == ".npz":
        return _from_npz(path, key, len(names), (h, w))
    raise InputError(f"masks {text}: expected a folder of mask images, a .npz or a .csv of boxes")


def _fit(m: np.ndarray, shape: tuple[int, int], where: str) -> np.ndarray:
    from skimage.transform import resize

    m = np.asarray(m)
    if m.ndim == 3:  # a colour mask image: inside where any colour channel is nonzero
        if m.shape[-1] in (2, 4):
            m = m[..., :-1]  # an alpha channel (opaque everywhere) says nothing
        m = (m != 0).any(axis=-1)
    if m.ndim != 2:
        raise InputError(f"mask {where}: expected a 2-D mask, got shape {m.shape}")
    m = m != 0
    if m.shape != shape:
        m = resize(m, shape, order=0, anti_aliasing=False, preserve_range=True) > 0.5
    return m


def _from_folder(root: Path, names: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
    from ..data import IMAGE_SUFFIXES, _read_image

    files = {p.stem: p for p in sorted(root.iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    out = np.zeros((len(names), *shape), bool)
    for i, n in enumerate(names):
        f = files.get(Path(n).stem)
        if f is None:
            raise InputError(f"masks {root}: no mask image for '{n}' (expected {Path(n).stem}.png)")
        out[i] = _fit(_read_image(f), shape, str(f))
    return out


def _from_npz(path: Path, key: str | None, n: int, shape: tuple[int, int]) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if key is None:
                key = "masks" if "masks" in z.files or len(z.files) != 1 else z.files[0]
            if key not in z.files:
                raise InputError(f"masks {path}: no array '{key}' (has {', '.join(z.files)})")
            arr = z[key]
    except (OSError, ValueError) as e:
        raise InputError(f"masks {path}: not a readable .npz ({e})") from None
    if arr.ndim != 3 or len(arr) != n:
        raise InputError(f"masks {path}:{key}: expected [{n}, H, W], got shape {arr.shape}")
    return np.stack([_fit(m, shape, f"{path}:{key}[{i}]") for i, m in enumerate(arr)])


def _from_boxes(path: Path, names: Sequence[str], shape: tuple[int, int]) -> np.ndarray:
    index = {Path(n).stem: i for i, n in enumerate(names)}
    out = np.zeros((len(names), *shape), bool)
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or (line == 1 and row[0].strip().lower() == "name"):
                continue
            try:
                name, x0, y0, x1, y1 = row[0].strip(), *(int(float(v)) for v in row[1:5])
            except ValueError:
                raise InputError(f"masks {path} line {line}: expected name,x0,y0,x1,y1") from None
            if len(row) != 5 or not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
                raise InputError(f"masks {path} line {line}: box {row[1:]} is not a box inside "
                                 f"{shape[1]}x{shape[0]} pixels (x0 < x1, y0 < y1)")
            i = index.get(Path(name).stem)
            if i is not None:
                out[i, y0:y1, x0:x1] = True
    return out
