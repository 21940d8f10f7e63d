"""Heatmap overlays: one figure per image, the image then one panel per method.

Signed maps use a diverging colour map centred at zero (red supports the class, blue opposes
it); magnitude maps a sequential one. Maps are drawn over a greyscale copy of the image with an
opacity that grows with the attribution, and the colour range ends at the 99.5th percentile of
the map's magnitude (the raw maps in maps.npz are not clipped).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .display import printable

DIVERGING = "RdBu_r"
SEQUENTIAL = "inferno"


@dataclass
class Panel:
    title: str
    map: np.ndarray  # [H, W]
    signed: bool


@dataclass
class Picture:
    """An image with a region outlined: how rule and exemplar methods show an explanation
    (:meth:`onnxsal.methods.Method.explanation_pictures`)."""

    title: str
    image: np.ndarray  # [C, H, W] in [0, 1]
    outline: np.ndarray | None = None  # bool [H, W]: the region drawn around, or None


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


def literal_texts(fig) -> None:
    """Draw every text of ``fig`` as written: no math text (a ``$`` in a label or file name
    would be parsed as TeX and can fail the figure), control characters and undecodable bytes
    shown as escapes (the font renderer refuses them). Call before layout; tick labels given
    with ``set_xticklabels`` are re-set at drawing, so pass those through ``printable``."""
    from matplotlib.text import Text

    for t in fig.findobj(Text):
        t.set_parse_math(False)
        t.set_text(printable(t.get_text(), keep_newlines=True))


def png_bytes(fig, layout: bool = True, **savefig) -> bytes:
    """``fig`` as PNG bytes, its texts literal (:func:`literal_texts`), laid out with
    ``tight_layout`` when ``layout``; closes the figure."""
    import matplotlib.pyplot as plt

    try:
        literal_texts(fig)
        if layout:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", **savefig)
        return buf.getvalue()
    finally:
        plt.close(fig)


def render(image: np.ndarray, panels: list[Panel], path: str | Path, title: str = "",
           columns: int = 5, dpi: int = 110) -> Path:
    """Write a PNG: the image, then one overlay per panel; returns the path."""
    from .files import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(_figure(image, panels, title, columns), dpi=dpi))
    return Path(path)


def _figure(image: np.ndarray, panels: list[Panel], title: str, columns: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(panels) + 1
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + (0.4 if title else 0)),
                             squeeze=False)
    try:
        _draw(fig, axes, image, panels, title)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw(fig, axes, image, panels, title) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

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


def render_pictures(pictures: list[Picture], path: str | Path, title: str = "", columns: int = 4,
                    dpi: int = 110) -> Path:
    """Write a PNG of the pictures in a grid, each outlined region drawn as a yellow contour;
    returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    cols = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.2 * rows + (0.4 if title else 0)),
                             squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, p in zip(axes.flat, pictures):
            # small images are enlarged (nearest) so that outlines follow pixel edges
            f = max(1, -(-128 // min(p.image.shape[1:])))
            disp = _display_image(np.repeat(np.repeat(p.image, f, axis=1), f, axis=2))
            ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1)
            if p.outline is not None and np.any(p.outline) and not np.all(p.outline):
                mask = np.repeat(np.repeat(np.asarray(p.outline, np.float32), f, axis=0), f, axis=1)
                ax.contour(mask, levels=[0.5], colors="yellow", linewidths=1.2)
            ax.set_title(p.title, fontsize=7)
        if title:
            fig.suptitle(title, fontsize=10)
    except BaseException:
        plt.close(fig)
        raise
    atomic_write_bytes(path, png_bytes(fig, dpi=dpi))
    return Path(path)


def draw_figures(figures) -> list[tuple[str, str]]:
    """Write each ``(name, write)`` figure in turn; one that fails becomes ``(name, "figure not
    written (...)")`` in the list returned and the others go on (callers write their data
    first, so a figure never costs data). A full disk still stops the run."""
    from .errors import OutputError, first_line

    failed = []
    for name, write in figures:
        try:
            write()
        except OutputError:
            raise
        except Exception as exc:  # matplotlib fails in many ways (fonts, layout, sizes)
            failed.append((name, f"figure not written ({type(exc).__name__}: "
                                  f"{printable(first_line(exc))})"))
    return failed
