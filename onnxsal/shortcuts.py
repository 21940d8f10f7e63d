"""The shortcut finder: per class, a region where saliency stays hot, tested by intervention.

A *shortcut* is a small region the model reads instead of the object (the classic case: an
X-ray classifier that reads the hospital's tag). :func:`find_shortcuts` looks for one per class
in three steps, all computed from the data and the model alone (docs/shortcuts.md):

1. **Where saliency concentrates.** Each map's magnitude is normalised to sum 1 (a
   distribution over pixels). For class c, ``D_c`` = the mean normalised map over the images
   labelled c minus the mean over the images of every other class. The box is the bounding
   box of the connected region around the maximum of ``D_c`` where ``D_c >= box_threshold *
   max(D_c)`` (default 0.5), grown on each side by ``box_grow`` (0.25) of its height / width
   (at least one pixel: gradient maps light a patch's edges more than its inside). With ``A``
   the box's area: *concentration* = the mean share of each class-c image's ``A`` most salient
   pixels that lie in the box; *chance* = ``A / (H W)`` (the share a map unrelated to the box
   puts there); *lift* = concentration / chance; *consistency* = the fraction of class-c
   images with at least half of their ``A`` most salient pixels in the box.
2. **Paste test.** ``pairs`` random (source, target) pairs: the source an image of class c,
   the target an image of another class that the model does not predict as c. The box's
   pixels are copied from the source onto the target; ``paste_flip_rate`` is the fraction of
   pasted targets now predicted c.
3. **Blank test.** ``pairs`` random images of class c predicted c: the box is filled with the
   image's own mean (per channel); ``blank_flip_rate`` is the fraction no longer predicted c.

**Control.** Every paste (blank) is repeated with a random box of the same size at a random
place that does not overlap the found box (the same place in source and target):
``control_flip_rate`` (``control_blank_flip_rate``). A large or central box copies much of
the object, and so does a random box of that size: the control then flips as often and the
excess is small. A region is **suspected** when all three hold:

* ``paste_excess = paste_flip_rate - control_flip_rate >= paste_margin`` (default 0.4);
* ``lift >= min_lift`` (default 3): single images' saliency really sits in the box (a box
  that only the class *average* lights, e.g. from a class whose objects vary in place, fails);
* the box covers at most ``max_box_fraction`` of the image (default 0.25).

The blank rates are reported as supporting evidence but do not decide (a model can learn the
shortcut *and* the object; blanking the tag then leaves the object to carry the class). The
defaults are justified by the measurements in benchmarks/results/audit/ (docs/shortcuts.md).

Every intervened image goes to ``predict_logits`` in batches of ``batch_size`` (the
intervened images are built batch by batch, so memory does not grow with ``pairs``). The
result depends only on the inputs and ``seed``.

Returns a JSON-ready dict::

    {"findings": [{"class", "box": [y0, x0, y1, x1] (end exclusive), "area_fraction",
                   "consistency", "concentration", "chance", "lift", "paste_flip_rate", "control_flip_rate",
                   "paste_excess", "blank_flip_rate", "control_blank_flip_rate",
                   "paste_pairs", "blank_images", "suspected", "reason",
                   "examples": [{"image", "target_image", "before", "after"}]}, ...],
     "settings": {...}, "skipped_classes": [{"class", "reason"}]}

``examples`` are flipped pastes (``image`` the source of class c, ``target_image`` the image it
was pasted onto, the target's prediction ``before`` and ``after``). The pixels for a figure:
:func:`shortcut_examples` (the targets before and after the paste) and
:func:`class_contrast_maps` (the ``D_c`` maps the boxes come from).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from scipy import ndimage

from .errors import InputError, OptionError

DEFAULTS: dict[str, Any] = {
    "box_threshold": 0.5,     # D_c >= this fraction of its maximum makes the hot region
    "box_grow": 0.25,         # the box grows by this share of its side on each side (>= 1 pixel)
    "pairs": 200,             # paste pairs and blanked images per class
    "paste_margin": 0.4,      # paste_flip_rate - control_flip_rate needed to suspect
    "min_lift": 3.0,          # concentration / chance needed to suspect
    "max_box_fraction": 0.25,  # a box larger than this share of the image is not a shortcut
    "min_images": 5,          # classes with fewer labelled images are skipped
    "examples": 4,            # flipped pastes kept per class
    "batch_size": 512,        # images per predict_logits call
    "classes": None,          # the classes to test (None: every class with min_images images)
}


def _check_inputs(images, labels, maps, num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(images)
    if x.ndim != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise InputError("images must be finite floats in [0, 1]")
    x = x.astype(np.float32, copy=False)
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"labels must be [N] = [{len(x)}], got shape {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be integers, got {y.dtype}")
    y = y.astype(np.int64)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise OptionError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"labels out of range 0..{num_classes - 1}: min {y.min()}, max {y.max()}")
    m = np.asarray(maps)
    if m.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise InputError(f"maps must be [N, H, W] = {[x.shape[0], x.shape[2], x.shape[3]]}, "
                         f"got shape {list(m.shape)}")
    m = np.abs(m.astype(np.float32))
    if not np.isfinite(m).all():
        bad = int(np.flatnonzero(~np.isfinite(m).reshape(len(m), -1).all(1))[0])
        raise InputError(f"maps hold NaN or Inf (first at image {bad})")
    if len(np.unique(y)) < 2:
        raise InputError(f"the shortcut finder needs images of at least two classes, got only "
                         f"{np.unique(y).tolist()}")
    return x, y, m


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise OptionError(f"unknown shortcut finder option(s) {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    if not 0.0 < float(o["box_threshold"]) <= 1.0:
        raise OptionError(f"box_threshold must be in (0, 1], got {o['box_threshold']}")
    if float(o["min_lift"]) < 0:
        raise OptionError(f"min_lift must be >= 0, got {o['min_lift']}")
    if not 0.0 <= float(o["box_grow"]) <= 1.0:
        raise OptionError(f"box_grow must be in [0, 1], got {o['box_grow']}")
    if not 0.0 < float(o["max_box_fraction"]) <= 1.0:
        raise OptionError(f"max_box_fraction must be in (0, 1], got {o['max_box_fraction']}")
    if o["classes"] is not None:
        try:
            o["classes"] = sorted({int(c) for c in o["classes"]})
        except (TypeError, ValueError):
            raise OptionError(f"classes must be a list of class indices, got {o['classes']!r}") from None
    for k in ("pairs", "min_images", "batch_size"):
        if int(o[k]) < 1:
            raise OptionError(f"{k} must be >= 1, got {o[k]}")
    if int(o["examples"]) < 0:
        raise OptionError(f"examples must be >= 0, got {o['examples']}")
    return o


def normalised_maps(maps: np.ndarray) -> np.ndarray:
    """|maps| [N, H, W], each scaled to sum 1 (an all-zero map stays zero)."""
    m = np.abs(np.asarray(maps, dtype=np.float32))
    s = m.reshape(len(m), -1).sum(1)
    return m / np.where(s > 0, s, 1.0)[:, None, None]


def class_contrast_maps(maps: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``D_c`` [num_classes, H, W]: the mean normalised map of class c minus the mean over the
    other classes' images (zero for a class without images, or when no other class has any)."""
    p = normalised_maps(maps)
    y = np.asarray(labels, dtype=np.int64)
    out = np.zeros((num_classes,) + p.shape[1:])
    for c in range(num_classes):
        inside = y == c
        if inside.any() and (~inside).any():
            out[c] = p[inside].mean(0) - p[~inside].mean(0)
    return out


def hot_box(contrast: np.ndarray, threshold: float, grow: float = 0.0) -> list[int] | None:
    """[y0, x0, y1, x1] (end exclusive) of the connected region (8-neighbours) around the
    maximum of ``contrast`` where it is >= ``threshold`` times that maximum, grown on each side
    by ``grow`` times its height (width), at least one pixel when ``grow`` > 0, and clipped to
    the image; None if the maximum is not positive."""
    peak = float(contrast.max())
    if not peak > 0:
        return None
    regions, _ = ndimage.label(contrast >= threshold * peak, structure=np.ones((3, 3)))
    py, px = np.unravel_index(int(np.argmax(contrast)), contrast.shape)
    ys, xs = np.nonzero(regions == regions[py, px])
    y0, x0, y1, x1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    if grow > 0:
        gy, gx = max(1, round(grow * (y1 - y0))), max(1, round(grow * (x1 - x0)))
        y0, x0 = max(0, y0 - gy), max(0, x0 - gx)
        y1, x1 = min(contrast.shape[0], y1 + gy), min(contrast.shape[1], x1 + gx)
    return [y0, x0, y1, x1]


def _consistency(p: np.ndarray, box: list[int]) -> tuple[float, float]:
    """(consistency, concentration) of maps (normalised, [n, H, W]) for a box of area A: the
    fraction of maps with at least half of their A most salient pixels in the box, and the
    mean share of their A most salient pixels that lie in the box (zero pixels never count)."""
    y0, x0, y1, x1 = box
    area = (y1 - y0) * (x1 - x0)
    inside = np.zeros(p.shape[1:], dtype=bool)
    inside[y0:y1, x0:x1] = True
    flat = p.reshape(len(p), -1)
    top = np.argsort(-flat, axis=1, kind="stable")[:, :area]
    # a pixel of zero saliency counts as outside (ties at zero would otherwise be decided by
    # their position)
    share = (inside.reshape(-1)[top] & (np.take_along_axis(flat, top, 1) > 0)).mean(1)
    return float((share >= 0.5).mean()), float(share.mean())


def _control_boxes(rng: np.random.Generator, box: list[int], hw: tuple[int, int], n: int) -> np.ndarray:
    """n random boxes [y0, x0] of the box's size, not overlapping it when any such place exists."""
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    H, W = hw
    ys, xs = np.meshgrid(np.arange(H - bh + 1), np.arange(W - bw + 1), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    apart = (ys + bh <= y0) | (ys >= y1) | (xs + bw <= x0) | (xs >= x1)
    if apart.any():
        ys, xs = ys[apart], xs[apart]
    pick = rng.integers(0, len(ys), size=n)
    return np.stack([ys[pick], xs[pick]], 1)


def _predict(predict_logits: Callable, x: np.ndarray, num_classes: int) -> np.ndarray:
    z = np.asarray(predict_logits(x))
    if z.ndim != 2 or z.shape != (len(x), num_classes):
        raise InputError(f"predict_logits returned shape {list(z.shape)} for {len(x)} images; "
                         f"expected [{len(x)}, {num_classes}]")
    return z.argmax(1).astype(np.int64)


def _predict_all(predict_logits, x: np.ndarray, num_classes: int, batch: int) -> np.ndarray:
    return np.concatenate([_predict(predict_logits, x[i:i + batch], num_classes)
                           for i in range(0, len(x), batch)]) if len(x) else np.zeros(0, np.int64)


# one intervention: (kind, class, source image, target image, y0, x0, bh, bw);
# kind 0 = paste the source's box onto the target, 1 = blank the target's box with its mean
_PASTE, _BLANK = 0, 1


def _materialise(x: np.ndarray, jobs: np.ndarray) -> np.ndarray:
    out = x[jobs[:, 3]].copy()
    for i, (kind, _c, src, _t, y0, x0, bh, bw) in enumerate(jobs):
        if kind == _PASTE:
            out[i, :, y0:y0 + bh, x0:x0 + bw] = x[src, :, y0:y0 + bh, x0:x0 + bw]
        else:
            out[i, :, y0:y0 + bh, x0:x0 + bw] = out[i].mean(axis=(1, 2))[:, None, None]
    return out


def _run_jobs(predict_logits, x: np.ndarray, jobs: np.ndarray, num_classes: int, batch: int) -> np.ndarray:
    if not len(jobs):
        return np.zeros(0, np.int64)
    return np.concatenate([_predict(predict_logits, _materialise(x, jobs[i:i + batch]), num_classes)
                           for i in range(0, len(jobs), batch)])


def _plan_class(rng, c: int, box: list[int], y: np.ndarray, pred: np.ndarray, hw, pairs: int):
    """Jobs for class c: found-box pastes, control pastes, found-box blanks, control blanks."""
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    sources = np.flatnonzero(y == c)
    targets = np.flatnonzero((y != c) & (pred != c))
    blanks = np.flatnonzero((y == c) & (pred == c))
    jobs: list[np.ndarray] = []
    groups = []
    if len(sources) and len(targets):
        s = sources[rng.integers(0, len(sources), size=pairs)]
        t = targets[rng.permutation(len(targets))[:pairs]] if len(targets) >= pairs else \
            targets[rng.integers(0, len(targets), size=pairs)]
        cb = _control_boxes(rng, box, hw, pairs)
        jobs.append(np.stack([np.full(pairs, _PASTE), np.full(pairs, c), s, t, np.full(pairs, y0),
                              np.full(pairs, x0), np.full(pairs, bh), np.full(pairs, bw)], 1))
        jobs.append(np.stack([np.full(pairs, _PASTE), np.full(pairs, c), s, t, cb[:, 0], cb[:, 1],
                              np.full(pairs, bh), np.full(pairs, bw)], 1))
        groups += ["paste", "control_paste"]
    if len(blanks):
        b = blanks[rng.permutation(len(blanks))[:pairs]] if len(blanks) >= pairs else \
            blanks[rng.integers(0, len(blanks), size=pairs)]
        cb = _control_boxes(rng, box, hw, len(b))
        n = len(b)
        jobs.append(np.stack([np.full(n, _BLANK), np.full(n, c), b, b, np.full(n, y0), np.full(n, x0),
                              np.full(n, bh), np.full(n, bw)], 1))
        jobs.append(np.stack([np.full(n, _BLANK), np.full(n, c), b, b, cb[:, 0], cb[:, 1],
                              np.full(n, bh), np.full(n, bw)], 1))
        groups += ["blank", "control_blank"]
    return jobs, groups


def _rate(a: np.ndarray) -> float | None:
    return float(a.mean()) if len(a) else None


def _verdict(f: dict, o: dict) -> tuple[bool, str]:
    if f["paste_flip_rate"] is None:
        return False, "no image of another class to paste onto"
    if f["area_fraction"] > o["max_box_fraction"]:
        return False, (f"box covers {f['area_fraction']:.0%} of the image (> {o['max_box_fraction']:.0%}): "
                       "the object, not a shortcut")
    if f["lift"] < o["min_lift"]:
        return False, (f"saliency of single images falls in the box only {f['lift']:.1f} times as much as by "
                       f"chance (< {o['min_lift']}): the box comes from averaging, not from every image")
    if f["paste_excess"] >= o["paste_margin"]:
        return True, (f"pasting the box turns {f['paste_flip_rate']:.0%} of other classes' images into this "
                      f"class (a random box of that size: {f['control_flip_rate']:.0%})")
    return False, (f"paste flip rate {f['paste_flip_rate']:.0%} is not {o['paste_margin']:.0%} above the "
                   f"control's {f['control_flip_rate']:.0%}")


def find_shortcuts(predict_logits: Callable[[np.ndarray], np.ndarray], images, labels, maps, *,
                   num_classes: int, seed: int = 0, **options: Any) -> dict:
    """Look for a shortcut region per class (the rule: the module docstring, docs/shortcuts.md).

    ``predict_logits(x [n, C, H, W] float32) -> [n, num_classes]`` (e.g. ``Engine.logits``);
    ``images`` float32 [N, C, H, W] in [0, 1]; ``labels`` int [N] (the true labels, or the
    model's predictions when there are none); ``maps`` [N, H, W] from any saliency method (the
    magnitude is used). ``options``: see :data:`DEFAULTS`. Returns the JSON-ready dict described
    in the module docstring; bad input raises a one-line InputError / OptionError.
    """
    x, y, m = _check_inputs(images, labels, maps, num_classes)
    o = _options(options)
    pairs, batch = int(o["pairs"]), int(o["batch_size"])
    hw = (x.shape[2], x.shape[3])
    rng = np.random.default_rng(seed)
    pred = _predict_all(predict_logits, x, num_classes, batch)
    p = normalised_maps(m)
    contrast = class_contrast_maps(m, y, num_classes)
    plans: list[tuple[dict, list[str], int]] = []
    all_jobs: list[np.ndarray] = []
    skipped = []
    wanted = range(num_classes) if o["classes"] is None else o["classes"]
    if any(not 0 <= c < num_classes for c in wanted):
        raise OptionError(f"classes must be in 0..{num_classes - 1}, got {list(wanted)}")
    for c in wanted:
        count = int((y == c).sum())
        if count < int(o["min_images"]):
            if count:
                skipped.append({"class": c, "reason": f"{count} images (< min_images {o['min_images']})"})
            continue
        box = hot_box(contrast[c], float(o["box_threshold"]), float(o["box_grow"]))
        if box is None:
            skipped.append({"class": c, "reason": "saliency is not higher in this class anywhere"})
            continue
        area = (box[2] - box[0]) * (box[3] - box[1])
        consistency, concentration = _consistency(p[y == c], box)
        f = {"class": c, "box": box, "area_fraction": area / (hw[0] * hw[1]), "consistency": consistency,
             "concentration": concentration, "chance": area / (hw[0] * hw[1]),
             "lift": concentration / (area / (hw[0] * hw[1]))}
        jobs, groups = _plan_class(rng, c, box, y, pred, hw, pairs)
        plans.append((f, groups, len(all_jobs)))
        all_jobs += jobs
    flat = np.concatenate(all_jobs) if all_jobs else np.zeros((0, 8), np.int64)
    after = _run_jobs(predict_logits, x, flat, num_classes, batch)
    sizes = [len(j) for j in all_jobs]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    findings = []
    for f, groups, first in plans:
        got = {g: (all_jobs[first + i], after[starts[first + i]:starts[first + i + 1]])
               for i, g in enumerate(groups)}
        c = f["class"]
        empty = (np.zeros((0, 8), np.int64), np.zeros(0, np.int64))
        pj, pa = got.get("paste", empty)
        _, ca = got.get("control_paste", empty)
        bj, ba = got.get("blank", empty)
        _, cba = got.get("control_blank", empty)
        f["paste_flip_rate"] = _rate(pa == c)
        f["control_flip_rate"] = _rate(ca == c)
        f["paste_excess"] = (None if f["paste_flip_rate"] is None
                             else f["paste_flip_rate"] - f["control_flip_rate"])
        f["blank_flip_rate"] = _rate(ba != c)
        f["control_blank_flip_rate"] = _rate(cba != c)
        f["paste_pairs"], f["blank_images"] = int(len(pa)), int(len(ba))
        f["suspected"], f["reason"] = _verdict(f, o)
        flipped = np.flatnonzero(pa == c)[:int(o["examples"])]
        f["examples"] = [{"image": int(pj[i, 2]), "target_image": int(pj[i, 3]),
                          "before": int(pred[pj[i, 3]]), "after": int(pa[i])} for i in flipped]
        findings.append(f)
    settings = {**o, "seed": int(seed), "num_classes": int(num_classes), "images": int(len(x)),
                "image_shape": [int(d) for d in x.shape[1:]],
                "calls": int(-(-len(x) // batch) + -(-len(flat) // batch))}
    return {"findings": findings, "settings": settings, "skipped_classes": skipped}


def paste(images: np.ndarray, source: int, target: int, box: list[int]) -> np.ndarray:
    """The target image [C, H, W] with the box's pixels copied from the source image."""
    y0, x0, y1, x1 = box
    out = np.array(images[target], dtype=np.float32, copy=True)
    out[:, y0:y1, x0:x1] = images[source][:, y0:y1, x0:x1]
    return out


def shortcut_examples(images, finding: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of a finding's examples, for a figure: (sources [k, C, H, W] (the images of
    the class the box is taken from), before [k, C, H, W] (the targets as they are), after
    [k, C, H, W] (the targets with the box pasted)), k = len(finding["examples"])."""
    x = np.asarray(images, dtype=np.float32)
    ex = finding["examples"]
    empty = np.zeros((0,) + x.shape[1:], np.float32)
    if not ex:
        return empty, empty, empty.copy()
    src = np.stack([x[e["image"]] for e in ex])
    before = np.stack([x[e["target_image"]] for e in ex])
    after = np.stack([paste(x, e["image"], e["target_image"], finding["box"]) for e in ex])
    return src, before, after


def box_iou(a: list[int], b: list[int]) -> float:
    """Intersection over union of two [y0, x0, y1, x1] boxes (end exclusive)."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def suspected(result: dict) -> Iterator[dict]:
    """The suspected findings of a :func:`find_shortcuts` result, largest paste excess first."""
    yield from sorted((f for f in result["findings"] if f["suspected"]), key=lambda f: -f["paste_excess"])


__all__ = ["DEFAULTS", "find_shortcuts", "shortcut_examples", "class_contrast_maps", "normalised_maps",
           "hot_box", "box_iou", "paste", "suspected"]
