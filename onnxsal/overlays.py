"""Heatmap overlays: one figure per image, the image then one panel per method.

Signed maps use a diverging colour map centred at zero (red supports the class, blue opposes
it); magnitude maps a sequential one. Maps are drawn over a greyscale copy of the image with an
opacity that grows with the attribution, and the colour range ends at the 99.5th percentile of
the map's magnitude (the raw maps in maps.npz are not clipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIVERGING = "RdBu_r"
SEQUENTIAL = "inferno"


@dataclass
class Panel:
    title: str
    map: np.ndarray  # [H, W]
    signed: bool


def _display_image(image: np.ndarray) -> np.ndarray:
    """[C, H, W] in [0, 1] -> an array imshow takes."""
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    if img.shape[0] == 1:
        return img[0]
    return np.transpose(img[:3], (1, 2, 0))


def _grey(image: np.ndarray) -> np.ndarray:
    img = np.clip(np.asarray(image, np.float32), 0, 1)
    return img.mean(axis=0)


def _robust_max(a: np.ndarray, q: float = 99.5) -> float:
    """The q-th percentile of a non-negative map (display range; a few extreme pixels would
    otherwise wash out the rest); never zero."""
    v = float(np.percentile(a, q)) if a.size else 0.0
    if v <= 0:
        v = float(a.max()) if a.size else 0.0
    return v if v > 0 else 1.0


def render(image: np.ndarray, panels: list[Panel], path: str | Path, title: str = "",
           columns: int = 5, dpi: int = 110) -> Path:
    """Write a PNG: the image, then one overlay per panel; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(panels) + 1
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    disp = _display_image(image)
    axes.flat[0].imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1)
    axes.flat[0].set_title("image", fontsize=9)
    grey = _grey(image)
    for ax, p in zip(list(axes.flat)[1:], panels):
        m = np.nan_to_num(np.asarray(p.map, np.float32))
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        if p.signed:
            lim = _robust_max(np.abs(m))
            norm = matplotlib.colors.Normalize(-lim, lim)
            strength = np.clip(np.abs(m) / lim, 0, 1)
            cmap = plt.get_cmap(DIVERGING)
        else:
            lo = float(m.min())
            hi = lo + _robust_max(m - lo)
            norm = matplotlib.colors.Normalize(lo, hi)
            strength = np.clip((m - lo) / (hi - lo), 0, 1)
            cmap = plt.get_cmap(SEQUENTIAL)
        rgba = cmap(norm(m))
        rgba[..., 3] = 0.2 + 0.8 * strength  # weak attribution lets the image show through
        ax.imshow(rgba)
        ax.set_title(p.title, fontsize=8)
        cb = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
