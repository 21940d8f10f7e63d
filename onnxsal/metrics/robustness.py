"""Robustness of saliency maps to small input changes (docs/metrics.md#robustness).

* ``max-sensitivity`` / ``avg-sensitivity`` (Yeh et al. 2019): the largest / mean over
  ``samples`` draws of uniform noise in the L-inf ball of radius ``radius`` of
  ``||Phi(x + delta) - Phi(x)||_F / ||Phi(x)||_F``;
* ``local-lipschitz`` (Alvarez-Melis & Jaakkola 2018): the largest over ``samples`` Gaussian
  neighbours x' (std ``std``) of ``||Phi(x') - Phi(x)||_2 / ||x' - x||_2``, the maps divided by
  their largest absolute value first;
* ``transform-stability``: the map of a slightly rotated, shifted or brightened image, warped
  back into the original frame, against the original map (Spearman and SSIM), over the
  transformations that keep the predicted class.

Phi(x) is ``explain(images, targets) -> maps [N, H, W]`` (the ``explain_class`` option, as
for ``random-logit``), always for the class predicted on the clean image; the stored maps are
Phi(x). All perturbed copies of all images of a batch go to ``explain`` (and, for
``transform-stability``, ``predict_logits``) in one call, split only when they exceed
``max_batch_bytes``; the noise of image i is drawn from a generator seeded with
``(seed, i)``, i the image's index within the evaluated set, so a batch split does not change
the scores. Perturbed pixels are clipped to [0, 1] (the engine's input space).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import InputError, OptionError
from .base import Metric, budget_slices
from .similarity import normalize_abs, spearman

ExplainClass = Callable[[np.ndarray, np.ndarray], np.ndarray]


class _Reexplain(Metric):
    """A metric that re-explains perturbed copies of each image with ``explain``."""

    samples_default = 200

    def __init__(self, explain: ExplainClass | None = None, samples: int | None = None,
                 seed: int = 0, max_batch_bytes: int = 256 << 20):
        self.explain = explain
        self.samples = int(self.samples_default if samples is None else samples)
        if self.samples < 1:
            raise OptionError(f"metric '{self.name}': samples must be >= 1, got {self.samples}")
        self.seed = int(seed)
        self.max_batch_bytes = int(max_batch_bytes)
        self._start = 0

    @classmethod
    def _explain_option(cls, options: dict) -> ExplainClass:
        if options.get("explain_class") is None:
            raise OptionError(f"metric '{cls.name}' needs explain_class (a callable "
                              "explain(images, targets) -> maps); onnxsal benchmark has none")
        return options["explain_class"]

    def settings(self) -> dict:
        return {"samples": self.samples, "seed": self.seed}

    def prepare(self, images, maps, labels) -> None:
        super().prepare(images, maps, labels)
        if self.explain is None:
            raise OptionError(f"metric '{self.name}' needs explain=... (explain_class)")
        self._start = int(self.index_offset)

    def bytes_per_image(self, shape) -> int:
        return 4 * math.prod(shape) * (self.samples + 1)

    def rng(self, i: int) -> np.random.Generator:
        """The generator of image ``i`` of the evaluated set."""
        return np.random.default_rng([self.seed, self._start + i])

    def explain_all(self, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``explain`` on a stack of inputs [M, C, H, W], in as few calls as the budget allows."""
        assert self.explain is not None
        out = []
        for sl in budget_slices(len(x), 4 * math.prod(x.shape[1:]), self.max_batch_bytes):
            m = np.asarray(self.explain(x[sl], targets[sl]), np.float64)
            if m.shape != (sl.stop - sl.start,) + x.shape[2:]:
                raise InputError(f"explain returned maps of shape {m.shape}; expected "
                                 f"{(sl.stop - sl.start,) + x.shape[2:]}")
            out.append(m)
        return np.concatenate(out)

    def predict_all(self, predict_logits, x: np.ndarray) -> np.ndarray:
        out = [np.asarray(predict_logits(x[sl]))
               for sl in budget_slices(len(x), 4 * math.prod(x.shape[1:]), self.max_batch_bytes)]
        return np.concatenate(out)

    def perturb(self, images: np.ndarray) -> np.ndarray:
        """[B, S, C, H, W] perturbed copies (image i's noise from :meth:`rng`)."""
        raise NotImplementedError

    def reexplained(self, predict_logits, images: np.ndarray):
        """(targets [B], perturbed inputs [B, S, C, H, W], their maps [B, S, H, W])."""
        targets = self.predict_all(predict_logits, images).argmax(axis=1)
        xp = self.perturb(images)
        b, s = xp.shape[:2]
        maps = self.explain_all(xp.reshape((b * s,) + images.shape[1:]), np.repeat(targets, s))
        self._start += b
        return targets, xp, maps.reshape((b, s) + images.shape[2:])


class _Sensitivity(_Reexplain):
    """Yeh et al. 2019's sensitivity under uniform noise of L-inf radius ``radius``."""

    direction = "lower"
    reduction = "max"  # over the draws: "max" or "mean"

    def __init__(self, explain: ExplainClass | None = None, samples: int | None = None,
                 radius: float = 0.2, seed: int = 0, max_batch_bytes: int = 256 << 20):
        super().__init__(explain, samples, seed, max_batch_bytes)
        self.radius = float(radius)
        if not self.radius > 0:
            raise OptionError(f"metric '{self.name}': radius must be > 0, got {radius}")

    @classmethod
    def from_options(cls, options: dict) -> _Sensitivity:
        return cls(cls._explain_option(options), options.get("sensitivity_samples"),
                   options.get("sensitivity_radius", 0.2), options.get("seed", 0),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {**super().settings(), "radius": self.radius}

    def perturb(self, images: np.ndarray) -> np.ndarray:
        s = self.samples
        noise = np.stack([self.rng(i).uniform(-self.radius, self.radius, size=(s,) + x.shape)
                          for i, x in enumerate(images)])
        return np.clip(images[:, None] + noise, 0.0, 1.0).astype(np.float32)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        _, _, mp = self.reexplained(predict_logits, images)
        m = np.asarray(maps, np.float64)
        num = np.linalg.norm((mp - m[:, None]).reshape(len(m), self.samples, -1), axis=2)
        den = np.linalg.norm(m.reshape(len(m), -1), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            value = (num.max(axis=1) if self.reduction == "max" else num.mean(axis=1)) / den
        return {"value": np.where(den > 0, value, np.nan)}


class MaxSensitivity(_Sensitivity):
    """max over noise draws of ||Phi(x+delta) - Phi(x)|| / ||Phi(x)|| (lower: robust)."""

    name = "max-sensitivity"
    reduction = "max"


class AvgSensitivity(_Sensitivity):
    """mean over noise draws of ||Phi(x+delta) - Phi(x)|| / ||Phi(x)|| (lower: robust)."""

    name = "avg-sensitivity"
    reduction = "mean"


def _max_normalised(m: np.ndarray) -> np.ndarray:
    """Each map [..., H, W] divided by its largest absolute value (all-zero maps stay 0)."""
    peak = np.abs(m).max(axis=(-2, -1), keepdims=True)
    return np.divide(m, peak, out=np.zeros_like(m), where=peak > 0)


class LocalLipschitz(_Reexplain):
    """max over Gaussian neighbours of ||Phi(x') - Phi(x)|| / ||x' - x|| (lower: robust)."""

    name = "local-lipschitz"
    direction = "lower"

    def __init__(self, explain: ExplainClass | None = None, samples: int | None = None,
                 std: float = 0.1, normalise: bool = True, seed: int = 0,
                 max_batch_bytes: int = 256 << 20):
        super().__init__(explain, samples, seed, max_batch_bytes)
        self.std = float(std)
        self.normalise = bool(normalise)
        if not self.std > 0:
            raise OptionError(f"metric '{self.name}': std must be > 0, got {std}")

    @classmethod
    def from_options(cls, options: dict) -> LocalLipschitz:
        return cls(cls._explain_option(options), options.get("lipschitz_samples"),
                   options.get("lipschitz_std", 0.1), options.get("lipschitz_normalise", True),
                   options.get("seed", 0), options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {**super().settings(), "std": self.std, "normalise": self.normalise}

    def perturb(self, images: np.ndarray) -> np.ndarray:
        s = self.samples
        noise = np.stack([self.rng(i).normal(0.0, self.std, size=(s,) + x.shape)
                          for i, x in enumerate(images)])
        return np.clip(images[:, None] + noise, 0.0, 1.0).astype(np.float32)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        _, xp, mp = self.reexplained(predict_logits, images)
        m = np.asarray(maps, np.float64)
        if self.normalise:
            m, mp = _max_normalised(m), _max_normalised(mp)
        b, s = xp.shape[:2]
        num = np.linalg.norm((mp - m[:, None]).reshape(b, s, -1), axis=2)
        dx = np.linalg.norm((xp.astype(np.float64) - images[:, None]).reshape(b, s, -1), axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(dx > 0, num / dx, np.nan)
        ok = np.isfinite(ratio).any(axis=1)
        value = np.full(b, np.nan)
        value[ok] = np.nanmax(ratio[ok], axis=1)
        return {"value": value}


#: the default transformations of transform-stability: 2-degree rotations, 1-2 px shifts
#: and +-5% brightness
TRANSFORMS = ("rotate:2", "rotate:-2", "shift:1,0", "shift:0,-1", "shift:-2,2",
              "brightness:1.05", "brightness:0.95")


def parse_transform(spec: str) -> tuple[str, tuple[float, ...]]:
    """'rotate:DEG' (counter-clockwise), 'shift:DX,DY' (px, right/down) or 'brightness:F'."""
    kind, _, args = str(spec).partition(":")
    try:
        values = tuple(float(a) for a in args.split(",")) if args else ()
    except ValueError:
        values = ()
    need = {"rotate": 1, "shift": 2, "brightness": 1}.get(kind)
    if need is None or len(values) != need or (kind == "brightness" and values[0] <= 0):
        raise OptionError(f"transform {spec!r}: expected 'rotate:DEG', 'shift:DX,DY' or "
                          "'brightness:FACTOR' (FACTOR > 0)")
    return kind, values


def _geometry(kind: str, values: tuple[float, ...], shape: tuple[int, int]):
    """The skimage transform mapping original pixel coordinates (x, y) to transformed ones."""
    from skimage.transform import EuclideanTransform

    if kind == "shift":
        return EuclideanTransform(translation=values)
    h, w = shape
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    # counter-clockwise on screen (y down) is a negative angle in (x, y) coordinates
    rot = EuclideanTransform(rotation=-np.deg2rad(values[0]))
    return EuclideanTransform(translation=-c) + rot + EuclideanTransform(translation=c)


def _warp(a: np.ndarray, tform, mode: str) -> np.ndarray:
    """Resample [..., H, W] so that pixel p of ``a`` lands at tform(p) (bilinear)."""
    from skimage.transform import warp

    flat = a.reshape((-1,) + a.shape[-2:])
    out = np.stack([warp(np.asarray(f, np.float64), tform.inverse, order=1, mode=mode,
                         cval=0.0, preserve_range=True) for f in flat])
    return out.reshape(a.shape)


def _masked_ssim(a01: np.ndarray, b01: np.ndarray, valid: np.ndarray) -> float:
    """Mean of skimage's SSIM map (the settings of similarity.ssim) over the valid pixels."""
    from skimage.metrics import structural_similarity

    a = np.where(valid, a01, 0.0)  # the pixels outside are equal (0) on both sides
    b = np.where(valid, b01, 0.0)
    side = min(a.shape)
    win = min(11, side if side % 2 else side - 1)
    _, full = structural_similarity(a, b, gaussian_weights=True, data_range=1.0, win_size=win,
                                    full=True)
    return float(full[valid].mean())


class TransformStability(_Reexplain):
    """Spearman of the original map and the warped-back map of a slightly transformed image,
    averaged over the transformations that keep the prediction (higher: stable)."""

    name = "transform-stability"
    direction = "higher"
    arrays = ("value", "ssim", "excluded")

    def __init__(self, explain: ExplainClass | None = None,
                 transforms: tuple[str, ...] | list[str] | None = None,
                 max_batch_bytes: int = 256 << 20):
        self.transforms = tuple(TRANSFORMS if transforms is None else transforms)
        if not self.transforms:
            raise OptionError("metric 'transform-stability' needs at least one transform")
        self.parsed = [parse_transform(t) for t in self.transforms]
        super().__init__(explain, len(self.transforms), 0, max_batch_bytes)

    @classmethod
    def from_options(cls, options: dict) -> TransformStability:
        return cls(cls._explain_option(options), options.get("stability_transforms"),
                   options.get("max_batch_bytes", 256 << 20))

    def settings(self) -> dict:
        return {"transforms": list(self.transforms)}

    def perturb(self, images: np.ndarray) -> np.ndarray:
        out = []
        for kind, values in self.parsed:
            if kind == "brightness":
                out.append(np.clip(images * values[0], 0.0, 1.0))
            else:
                out.append(_warp(images, _geometry(kind, values, images.shape[2:]), "edge"))
        return np.stack(out, axis=1).astype(np.float32)

    def back(self, maps: np.ndarray, shape: tuple[int, int]):
        """Maps [B, T, H, W] of the transformed images in the original frame, and the
        per-transform mask [T, H, W] of original pixels that stayed inside the image."""
        backs, valid = [], []
        ones = np.ones(shape)
        for k, (kind, values) in enumerate(self.parsed):
            if kind == "brightness":
                backs.append(maps[:, k])
                valid.append(np.ones(shape, bool))
                continue
            tform = _geometry(kind, values, shape)
            # pixel p of the original sits at tform(p) in the transformed image
            backs.append(_warp(maps[:, k], tform.inverse, "constant"))
            valid.append(_warp(_warp(ones, tform, "constant"), tform.inverse, "constant") > 1 - 1e-6)
        return np.stack(backs, axis=1), np.stack(valid)

    def evaluate_batch(self, predict_logits, images, maps, labels) -> dict:
        b, t = len(images), len(self.parsed)
        xt = self.perturb(images)
        flat = xt.reshape((b * t,) + images.shape[1:])
        targets = self.predict_all(predict_logits, images).argmax(axis=1)
        kept = (self.predict_all(predict_logits, flat).argmax(axis=1)
                == np.repeat(targets, t)).reshape(b, t)
        mt = np.zeros((b * t,) + images.shape[2:])
        idx = np.flatnonzero(kept.reshape(-1))
        if len(idx):
            mt[idx] = self.explain_all(flat[idx], np.repeat(targets, t)[idx])
        backs, valid = self.back(mt.reshape((b, t) + images.shape[2:]), images.shape[2:])
        rho = np.full((b, t), np.nan)
        ss = np.full((b, t), np.nan)
        for i in range(b):
            for k in np.flatnonzero(kept[i]):
                v = valid[k]
                a01, b01 = np.zeros(v.shape), np.zeros(v.shape)
                # each side normalised over the pixels compared (PAIR's |.| and p99 scaling)
                a01[v] = normalize_abs(np.asarray(maps[i], np.float64)[v][None])[0]
                b01[v] = normalize_abs(backs[i, k][v][None])[0]
                rho[i, k] = spearman(a01[v], b01[v])
                ss[i, k] = _masked_ssim(a01, b01, v)
        with np.errstate(invalid="ignore"):
            value = np.array([np.mean(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan
                              for r in rho])
            ssim = np.array([np.mean(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan
                             for r in ss])
        return {"value": value, "ssim": ssim, "excluded": (~kept).sum(axis=1)}

    def aggregate(self, parts: list) -> dict:
        res = super().aggregate(parts)
        ss = np.concatenate([np.asarray(p["ssim"], np.float64).reshape(-1) for p in parts])
        ex = np.concatenate([np.asarray(p["excluded"]).reshape(-1) for p in parts])
        res.update(ssim=float(np.nanmean(ss)) if np.isfinite(ss).any() else float("nan"),
                   per_image_ssim=ss, excluded=int(ex.sum()), per_image_excluded=ex,
                   transforms=len(self.parsed))
        return res

    def summarize(self, result, names: list[str]) -> dict:
        out = super().summarize(result, names)
        out.update(ssim=result["ssim"], excluded=result["excluded"],
                   evaluated=result["images"] * result["transforms"] - result["excluded"])
        return out


__all__ = ["MaxSensitivity", "AvgSensitivity", "LocalLipschitz", "TransformStability", "TRANSFORMS",
           "parse_transform"]
