"""Maps made elsewhere (``onnxsal evaluate --maps FILE.npz``): reading and checking the
arrays of an .npz without loading more than its headers first, and the channel-reduction
rule that turns [N, C, H, W] maps into [N, H, W] (:func:`channel_reduction`)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..display import printable
from ..errors import InputError, OptionError, first_line

# --------------------------------------------------------------------------------------------
# maps made elsewhere


def channel_reduction(method: str) -> str:
    """How [N, C, H, W] maps of ``method`` become [N, H, W]: "sum" over channels for a signed
    attribution (onnxsal's signed methods sum, so that sums of attributions stay sums; also
    any name that is not an onnxsal method), "max-abs" (the maximum over channels of the
    absolute value) for an onnxsal method whose maps are magnitudes (original, positive,
    negative, active, inactive, gradcam, ...), as onnxsal reduces its own."""
    from .. import methods

    try:
        meth = methods.get(method)
    except OptionError:
        return "sum"
    return "sum" if meth.signed else "max-abs"


def reduce_channels(maps: np.ndarray, rule: str) -> np.ndarray:
    """[N, C, H, W] -> [N, H, W] by ``rule`` ("sum" or "max-abs"); [N, H, W] as it is."""
    a = np.asarray(maps)
    if a.ndim == 3:
        return a.astype(np.float32)
    a = a.astype(np.float64)
    out = a.sum(axis=1) if rule == "sum" else np.abs(a).max(axis=1)
    return out.astype(np.float32)


def _npy_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, read from its header (no data read)."""
    with zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_header(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype, n: int,
                  at_least: bool, hw: tuple[int, int], channels: int) -> None:
    what = f"{where}: array '{printable(key)}' of shape {list(shape)}"
    if dtype.hasobject:
        raise InputError(f"{what} holds Python objects (pickled data is refused)")
    if dtype.kind not in "biuf":
        raise InputError(f"{what} has dtype {dtype}, not numbers")
    if len(shape) not in (3, 4):
        raise InputError(f"{what}: expected [N, H, W] or [N, C, H, W] maps")
    good_n = shape[0] >= n if at_least else shape[0] == n
    if not good_n or tuple(shape[-2:]) != tuple(hw):
        need = f"{'at least ' if at_least else ''}{n} maps of {hw[0]}x{hw[1]}"
        raise InputError(f"{what}: expected {need} (the data's images, in their order)")
    if len(shape) == 4 and shape[1] not in (1, channels):
        raise InputError(f"{what}: {shape[1]} channels; the images have {channels}")


def load_maps(path: str | os.PathLike, methods: Sequence[str] | None, n: int,
              hw: tuple[int, int], channels: int, at_least: bool = False
              ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({method: float32 [n, H, W]}, {method: channel reduction}) from an .npz with one array
    per method (``methods``: the keys to use, default all), [N, H, W] or [N, C, H, W] (C = 1
    or the images' channels), ``n`` maps of ``hw`` (``at_least``: N >= n, the first n used,
    for a --limit). Each array's header is checked before its data is read; a wrong shape,
    anything but numbers, pickled objects or NaN/Inf is one InputError naming the key."""
    where = f"--maps {printable(path)}"
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{where}: no such file")
    try:
        zf = zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}: not an .npz file ({first_line(exc)})") from None
    with zf:
        keys = [k[:-4] for k in zf.namelist() if k.endswith(".npy")]
        if not keys:
            raise InputError(f"{where}: holds no arrays (expected one per method)")
        use = list(keys) if not methods else list(methods)
        missing = [m for m in use if m not in keys]
        if missing:
            raise InputError(f"{where}: no array for method(s) {', '.join(map(printable, missing))} "
                             f"(it has {', '.join(map(printable, keys))})")
        out, rules = {}, {}
        for k in use:
            try:
                shape, dtype = _npy_header(zf, k)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"{where}: array '{printable(k)}' is unreadable "
                                 f"({first_line(exc)})") from None
            _check_header(where, k, shape, dtype, n, at_least, hw, channels)
            try:
                with zf.open(k + ".npy") as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"{where}: array '{printable(k)}' is unreadable "
                                 f"({first_line(exc)})") from None
            a = a[:n]
            bad = int((~np.isfinite(a)).sum()) if a.dtype.kind == "f" else 0
            if bad:
                raise InputError(f"{where}: array '{printable(k)}' of shape {list(shape)} has "
                                 f"{bad} NaN or infinite values")
            rules[k] = "none" if a.ndim == 3 else channel_reduction(k)
            out[k] = reduce_channels(a, rules[k])
    return out, rules


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(repr((a.shape, str(a.dtype))).encode())
    h.update(a.tobytes())
    return h.hexdigest()

