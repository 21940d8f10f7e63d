"""Black-deletion and white-deletion (Signed Saliency Maps; docs/definitions.md#deletion).

For each image and fraction p in {0, 0.1, ..., 0.9}: k = round(p * H * W) (Python's round),
v = the value at index k of the map sorted in descending order, and the pixels with
``s > v and s != 0`` are set to 0 (black) or 1 (white) in every channel of the raw [0, 1]
image. At most k pixels go, ties at the threshold stay, zero-saliency pixels never go. The
model's top-1 prediction on each deleted image is compared with the true label ("accuracy")
or with the prediction on the clean image ("allegiance"); the curve is the mean over images,
and its AUC is the trapezoid rule with dx = 0.1 over the 10 points (not normalised).

All the deleted variants of a batch of images are built at once and sent through the model
in large batches; the maps are computed once, on the clean images, by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric, PredictLogits, check_images_maps

FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(10))  # 0.0, 0.1, ..., 0.9
MODES = ("black", "white")
FILL = {"black": 0.0, "white": 1.0}
METRICS = ("accuracy", "allegiance")


def deletion_counts(h: int, w: int, fractions=FRACTIONS) -> list[int]:
    """k = round(p * H * W) for each fraction (Python's round: halves go to the even integer)."""
    return [int(round(float(p) * h * w)) for p in fractions]


def deletion_masks(maps: np.ndarray, fractions=FRACTIONS) -> np.ndarray:
    """bool [N, P, H, W]: True where a pixel is deleted at fraction p (docs/definitions.md#deletion)."""
    maps = np.asarray(maps)
    if maps.ndim == 2:
        maps = maps[None]
    n, h, w = maps.shape
    for p in fractions:
        if not 0.0 <= float(p) < 1.0:
            raise OptionError(f"deletion fractions must lie in [0, 1), got {p}")
    ks = deletion_counts(h, w, fractions)
    flat = maps.reshape(n, h * w)
    desc = -np.sort(-flat, axis=1)  # descending
    # k = H*W only happens for maps of at most 4 pixels (round(0.9 * 4) = 4): then every
    # non-zero pixel may go, as if the sorted map ended with -inf
    desc = np.concatenate([desc.astype(np.float64), np.full((n, 1), -np.inf)], axis=1)
    v = desc[:, ks]  # [N, P]
    s = maps[:, None]  # [N, 1, H, W]
    return (s > v[:, :, None, None]) & (s != 0)


def delete(images: np.ndarray, masks: np.ndarray, mode: str) -> np.ndarray:
    """[N, P, C, H, W]: each image with its masked pixels set to 0 (black) or 1 (white)."""
    if mode not in FILL:
        raise OptionError(f"deletion mode must be one of {', '.join(MODES)}, got '{mode}'")
    images = np.asarray(images, np.float32)
    return np.where(masks[:, :, None], np.float32(FILL[mode]), images[:, None])


def auc(curve, dx: float = 0.1) -> float:
    """Trapezoid rule with spacing dx (not normalised)."""
    return float(np.trapezoid(np.asarray(curve, np.float64), dx=dx))


@dataclass
class DeletionResult:
    """Per-image predictions and the curves and AUCs they give.

    ``predictions[mode]`` is int64 [N, P] (-1 where the image failed), ``reference`` the labels
    or clean predictions [N], ``errors`` one string per image ('' when it is fine).
    """

    metric: str
    fractions: list[float]
    predictions: dict[str, np.ndarray]
    reference: np.ndarray
    errors: list[str]
    curves: dict[str, list[float]] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        return np.array([not e for e in self.errors], bool)

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def correct(self, mode: str) -> np.ndarray:
        """bool [N_valid, P]: prediction agrees with the reference."""
        ok = self.valid
        return self.predictions[mode][ok] == self.reference[ok][:, None]

    def failures(self, names: list[str] | None = None) -> list[tuple[str, str]]:
        return [((names[i] if names else str(i)), e) for i, e in enumerate(self.errors) if e]

    def to_dict(self) -> dict:
        return {"metric": self.metric, "fractions": list(self.fractions),
                "images": len(self.errors), "valid_images": self.n_valid,
                "curves": {m: list(c) for m, c in self.curves.items()},
                "auc": dict(self.auc)}


class BlackWhiteDeletion(Metric):
    """Black- and white-deletion; lower AUC means the map found the pixels that matter."""

    name = "black-white-deletion"
    direction = "lower"
    arrays: tuple[str, ...] = ("reference", "errors")  # and "pred_<mode>" (set in __init__)
    shard_prefix = ""

    def __init__(self, metric: str = "accuracy", fractions=FRACTIONS, modes=MODES,
                 max_batch_bytes: int = 256 << 20):
        if metric not in METRICS:
            raise OptionError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
        if not fractions or float(fractions[0]) != 0.0:
            raise OptionError("deletion fractions must start at 0 (the clean image)")
        for m in modes:
            if m not in FILL:
                raise OptionError(f"deletion mode must be one of {', '.join(MODES)}, got '{m}'")
        self.metric = metric
        self.fractions = [float(p) for p in fractions]
        self.modes = tuple(modes)
        self.max_batch_bytes = int(max_batch_bytes)
        self.arrays = ("reference", "errors") + tuple(f"pred_{m}" for m in self.modes)

    @classmethod
    def from_options(cls, options: dict) -> BlackWhiteDeletion:
        return cls(options.get("metric", "accuracy"), options.get("fractions", FRACTIONS),
                   options.get("modes", MODES), options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"metric": self.metric, "fractions": self.fractions, "modes": list(self.modes)}

    def check_labels(self, labels, num_classes: int, model: str, source: str) -> None:
        """Accuracy needs labels, each a class of the model."""
        if self.metric != "accuracy":
            return
        if labels is None:
            raise OptionError(f"{source} has no labels: metric 'accuracy' needs them "
                              "(use --metric allegiance)")
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise InputError(f"labels out of range for {model} ({num_classes} classes): "
                             f"{sorted(set(labels[bad].tolist()))[:5]}")

    # -- pipeline ------------------------------------------------------------------------
    def prepare(self, images, maps, labels) -> None:
        check_images_maps(images, maps)
        if self.metric == "accuracy":
            if labels is None:
                raise OptionError("metric 'accuracy' needs labels; these images have none "
                                  "(use --metric allegiance)")
            if len(labels) != len(images):
                raise InputError(f"{len(labels)} labels for {len(images)} images")

    def bytes_per_image(self, shape) -> int:
        """The clean image and every deleted variant, and their copy in the model batch."""
        return (1 + len(self.modes) * (len(self.fractions) - 1)) * 4 * 2 * int(np.prod(shape))

    def evaluate_batch(self, predict_logits: PredictLogits, images: np.ndarray, maps: np.ndarray,
                       labels: np.ndarray | None) -> dict:
        """Run every deleted variant of the batch in one model call; per-image arrays."""
        images = np.asarray(images, np.float32)
        maps = np.asarray(maps)
        n = len(images)
        P = len(self.fractions)
        errors = [""] * n
        preds = {m: np.full((n, P), -1, np.int64) for m in self.modes}
        clean = np.full(n, -1, np.int64)
        finite_map = np.isfinite(maps.reshape(n, -1)).all(axis=1)
        for j in np.flatnonzero(~finite_map):
            errors[j] = "saliency map contains NaN or Inf"
        idx = np.flatnonzero(finite_map)
        if len(idx):
            self._predict(predict_logits, images[idx], maps[idx], idx, clean, preds, errors)
        ref = clean if self.metric == "allegiance" else np.asarray(labels, np.int64)
        for i, e in enumerate(errors):
            if e:
                clean[i] = -1
                for mode in self.modes:
                    preds[mode][i] = -1
        return {"reference": ref.astype(np.int64), "errors": np.asarray(errors, dtype=str),
                **{f"pred_{mode}": preds[mode] for mode in self.modes}}

    def _predict(self, predict_logits, x, m, idx, clean, preds, errors) -> None:
        """Fill ``clean``, ``preds`` and ``errors`` at ``idx`` from one model call."""
        b, c, h, w = x.shape
        P = len(self.fractions)
        masks = deletion_masks(m, self.fractions[1:])  # [b, P-1, H, W]
        batch = np.concatenate([x] + [delete(x, masks, mode).reshape(-1, c, h, w)
                                      for mode in self.modes])
        logits = np.asarray(predict_logits(batch))
        if logits.ndim != 2 or logits.shape[0] != len(batch):
            raise InputError(f"the model returned logits of shape {logits.shape} for "
                             f"{len(batch)} images")
        finite = np.isfinite(logits).all(axis=1)
        pred = logits.argmax(axis=1).astype(np.int64)
        clean[idx] = pred[:b]
        bad = ~finite[:b]
        off = b
        for mode in self.modes:
            pm = pred[off:off + b * (P - 1)].reshape(b, P - 1)
            fm = finite[off:off + b * (P - 1)].reshape(b, P - 1)
            preds[mode][idx, 0] = pred[:b]
            preds[mode][idx, 1:] = pm
            for j in np.flatnonzero(~fm.all(axis=1) & ~bad):
                p = self.fractions[1 + int(np.flatnonzero(~fm[j])[0])]
                errors[idx[j]] = f"non-finite logits at fraction {p:g} ({mode} deletion)"
            off += b * (P - 1)
        for j in np.flatnonzero(bad):
            errors[idx[j]] = "non-finite logits on the clean image"

    def summarize(self, result: DeletionResult, names: list[str]) -> dict:
        return {"images": len(result.errors), "valid_images": result.n_valid,
                "fractions": result.fractions, "curves": result.curves, "auc": result.auc,
                "failures": [{"name": n, "error": e} for n, e in result.failures(names)]}

    def per_image_scores(self, result: DeletionResult) -> dict[str, np.ndarray]:
        """Per mode, each image's AUC of its 0/1 correctness curve (the same rule as the
        benchmark's AUC, so their mean is the AUC of the mean curve); NaN for failed images."""
        out = {}
        for mode in self.modes:
            v = np.full(len(result.errors), np.nan)
            ok = result.valid
            if ok.any():
                c = result.correct(mode).astype(np.float64)
                v[ok] = (np.trapezoid(c, dx=0.1, axis=1) if tuple(self.fractions) == FRACTIONS
                         else np.trapezoid(c, x=self.fractions, axis=1))
            out[mode] = v
        return out

    def place(self, entry: dict, summary: dict) -> None:
        """The benchmark's own metric: its summary is the top level of a result entry."""
        entry.update(summary)

    def clean_score(self, result: DeletionResult) -> dict | None:
        """The top-1 score of the clean images (fraction 0) against the reference."""
        if not result.n_valid:
            return None
        ok = result.valid
        c0 = result.predictions[self.modes[0]][ok][:, 0] == result.reference[ok]
        return {"score": float(c0.mean()), "images": int(ok.sum())}

    def aggregate(self, parts: list[dict]) -> DeletionResult:
        """Concatenate per-image parts and compute the curves (mean over valid images)."""
        if not parts:
            raise InputError("no images to evaluate")
        ref = np.concatenate([np.asarray(p["reference"], np.int64) for p in parts])
        errors = [str(e) for p in parts for e in np.asarray(p["errors"]).tolist()]
        preds = {m: np.concatenate([np.asarray(p[f"pred_{m}"], np.int64) for p in parts])
                 for m in self.modes}
        res = DeletionResult(self.metric, list(self.fractions), preds, ref, errors)
        for mode in self.modes:
            if res.n_valid:
                curve = res.correct(mode).mean(axis=0)
                res.curves[mode] = [float(v) for v in curve]
                res.auc[mode] = (auc(curve, dx=0.1) if tuple(self.fractions) == FRACTIONS
                                 else float(np.trapezoid(curve, x=self.fractions)))
            else:
                res.curves[mode] = [float("nan")] * len(self.fractions)
                res.auc[mode] = float("nan")
        return res
