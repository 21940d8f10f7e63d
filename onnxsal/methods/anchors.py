"""Anchors for images (Ribeiro, Singh and Guestrin, AAAI 2018), forward passes only.

An anchor is a set A of superpixels such that, when A is kept and every other superpixel is
independently kept with probability 1/2 (else replaced by its mean colour), the model still
predicts the explained class with probability (precision) >= ``threshold``. Among such sets
the search returns one with the largest coverage (share of unconstrained samples that keep
all of A). Search: beam search from the empty anchor, one superpixel added per step; the
best ``beam_size`` candidates of a step are picked by KL-LUCB (Kaufmann and Kalyanakrishnan
2013) with epsilon = ``tau``; a candidate is valid when its mean precision >= threshold and
its KL lower bound > threshold - tau. Design and defaults: docs/anchors.md.

Every round of samples (all candidates' first samples, then each KL-LUCB round) goes to
``engine.logits`` as one large batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import OptionError
from .base import Maps, Method, class_label
from .superpixel import SuperpixelImage, check_segmentation, superpixel_fill, superpixels

Anchor = tuple[int, ...]


def kl_bernoulli(p, q) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise (p and q clipped into (0, 1))."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    q = np.clip(np.asarray(q, np.float64), 1e-12, 1 - 1e-12)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def kl_upper(p, level, iters: int = 60) -> np.ndarray:
    """The largest q in [p, 1] with KL(p || q) <= level, by bisection (elementwise)."""
    p, level = np.broadcast_arrays(np.asarray(p, np.float64), np.asarray(level, np.float64))
    lo, hi = p.copy(), np.ones_like(p)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = kl_bernoulli(p, mid) > level
        hi, lo = np.where(over, mid, hi), np.where(over, lo, mid)
    return lo


def kl_lower(p, level, iters: int = 60) -> np.ndarray:
    """The smallest q in [0, p] with KL(p || q) <= level, by bisection (elementwise)."""
    p, level = np.broadcast_arrays(np.asarray(p, np.float64), np.asarray(level, np.float64))
    lo, hi = np.zeros_like(p), p.copy()
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = kl_bernoulli(p, mid) > level
        lo, hi = np.where(over, mid, lo), np.where(over, hi, mid)
    return hi


def lucb_beta(arms: int, t: int, delta: float) -> float:
    """KL-LUCB's exploration rate at round t: log(k1 K t^a / delta) + log log(...), with
    k1 = 405.5 and a = 1.1 (Kaufmann and Kalyanakrishnan 2013, Theorem 3)."""
    temp = math.log(405.5 * arms * t ** 1.1 / delta)
    return temp + math.log(temp)


class _Sampler:
    """The perturbation distribution of one image and the tally of every anchor sampled."""

    def __init__(self, engine, image, seg, fill, target, rng, keep: int):
        self.features = SuperpixelImage(engine, image, seg, fill)
        self.target, self.rng, self.keep = int(target), rng, keep
        self.k = self.features.k
        self.n: dict[Anchor, int] = {}
        self.pos: dict[Anchor, int] = {}
        self.examples: dict[Anchor, dict[str, list]] = {}

    @property
    def evaluations(self) -> int:
        return self.features.evaluations

    @property
    def calls(self) -> int:
        return self.features.calls

    def draw(self, anchor: Anchor, m: int) -> np.ndarray:
        """[m, k] bool: the anchor's superpixels kept, each other one with probability 1/2."""
        z = self.rng.random((m, self.k)) < 0.5
        z[:, list(anchor)] = True
        return z

    def predict(self, z: np.ndarray) -> np.ndarray:
        """The model's top class on the perturbed images of the rows of z (memory-bounded)."""
        return self.features.predict(z)

    def sample(self, requests: list[tuple[Anchor, int]]) -> None:
        """Draw m samples for each (anchor, m) and evaluate them all in one batch."""
        zs = [self.draw(a, m) for a, m in requests]
        pred = self.predict(np.concatenate(zs))
        off = 0
        for (a, m), z in zip(requests, zs, strict=True):
            p = pred[off:off + m]
            off += m
            ok = p == self.target
            self.n[a] = self.n.get(a, 0) + m
            self.pos[a] = self.pos.get(a, 0) + int(ok.sum())
            ex = self.examples.setdefault(a, {"positive": [], "negative": [], "negative_class": []})
            for row, good, cls in zip(z, ok, p, strict=True):
                kind = "positive" if good else "negative"
                if len(ex[kind]) < self.keep:
                    ex[kind].append(row)
                    if not good:
                        ex["negative_class"].append(int(cls))

    def mean(self, a: Anchor) -> float:
        return self.pos[a] / self.n[a]

    def bounds(self, a: Anchor, beta: float) -> tuple[float, float, float]:
        """(mean, KL lower bound, KL upper bound) of the anchor's precision at level beta / n."""
        m = self.mean(a)
        level = beta / self.n[a]
        return m, float(kl_lower(m, level)), float(kl_upper(m, level))


def _kl_lucb(s: _Sampler, cands: list[Anchor], top: int, eps: float, delta: float,
             batch: int) -> list[Anchor]:
    """The ``top`` candidates of highest precision, to within eps with probability 1 - delta
    (KL-LUCB: sample the weakest of the leaders and the strongest of the rest until the
    rest's upper bounds are within eps of the leaders' lower bounds)."""
    if top >= len(cands):
        return sorted(cands, key=s.mean, reverse=True)
    t = 1
    while True:
        means = np.array([s.mean(c) for c in cands])
        n = np.array([s.n[c] for c in cands], np.float64)
        order = np.argsort(-means, kind="stable")
        lead, rest = order[:top], order[top:]
        beta = lucb_beta(len(cands), t, delta)
        ub = kl_upper(means[rest], beta / n[rest])
        lb = kl_lower(means[lead], beta / n[lead])
        if ub.max() - lb.min() <= eps:
            return [cands[j] for j in lead]
        s.sample([(cands[rest[int(ub.argmax())]], batch), (cands[lead[int(lb.argmin())]], batch)])
        t += 1


def _settle(s: _Sampler, anchors: list[Anchor], thr: float, tau: float, beta: float,
            batch: int) -> list[Anchor]:
    """Sample the anchors until each is clearly valid or invalid; return the valid ones."""
    def unsure(a):
        m, lb, ub = s.bounds(a, beta)
        return (m >= thr and lb < thr - tau) or (m < thr and ub >= thr + tau)

    while todo := [a for a in anchors if unsure(a)]:
        s.sample([(a, batch) for a in todo])
    return [a for a in anchors if s.mean(a) >= thr and s.bounds(a, beta)[1] > thr - tau]


def anchor_search(s: _Sampler, cover: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
    """Beam search for the valid anchor of highest coverage (docs/anchors.md#search)."""
    thr, tau, delta = opts["threshold"], opts["tau"], opts["delta"]
    batch, beam = opts["batch_size"], opts["beam_size"]
    max_size = s.k if opts["max_anchor_size"] is None else min(s.k, opts["max_anchor_size"])
    beta = math.log(1 / (delta / (1 + (beam - 1) * s.k)))

    def coverage(a: Anchor) -> float:
        return float(cover[:, list(a)].all(axis=1).mean()) if a else 1.0

    best: Anchor | None = None
    best_cov = -1.0
    s.sample([((), batch)])
    frontier: list[Anchor] = [()]
    seen: list[Anchor] = [()]
    for size in range(max_size + 1):
        if size:
            cands = sorted({tuple(sorted(a + (f,))) for a in frontier for f in range(s.k)
                            if f not in a})
            cands = [c for c in cands if coverage(c) > best_cov]
            if not cands:
                break
            s.sample([(c, batch) for c in cands if c not in s.n])
            frontier = _kl_lucb(s, cands, min(beam, len(cands)), tau, delta, batch)
            seen += frontier
        for a in _settle(s, frontier, thr, tau, beta, batch):
            if coverage(a) > best_cov:
                best, best_cov = a, coverage(a)
        if best_cov >= 1.0:
            break
    met = best is not None
    if best is None:
        best = max(seen, key=lambda a: (s.mean(a), coverage(a)))
    m, lb, ub = s.bounds(best, beta)
    ex = s.examples[best]
    k = s.k
    return {"anchor": list(best), "precision": m, "bounds": (lb, ub), "coverage": coverage(best),
            "met_threshold": met, "samples": s.n[best],
            "examples": {"positive": np.array(ex["positive"], bool).reshape(-1, k),
                         "negative": np.array(ex["negative"], bool).reshape(-1, k),
                         "negative_class": np.array(ex["negative_class"], np.int64)}}


def _checked(opts: dict[str, Any]) -> dict[str, Any]:
    """The options as numbers, each checked; a bad one is one OptionError line."""
    o = dict(opts)
    try:
        o["threshold"], o["delta"], o["tau"] = (float(o[k]) for k in ("threshold", "delta", "tau"))
        for k in ("batch_size", "beam_size", "coverage_samples", "n_segments", "examples"):
            o[k] = int(o[k])
        if o["max_anchor_size"] is not None:
            o["max_anchor_size"] = int(o["max_anchor_size"])
    except (TypeError, ValueError):
        raise OptionError("anchor options threshold, delta, tau must be numbers and batch_size, "
                          "beam_size, coverage_samples, n_segments, examples, max_anchor_size "
                          "integers") from None
    bad = [f"{k}={o[k]!r}" for k, ok in (
        ("threshold", 0 < o["threshold"] <= 1), ("delta", 0 < o["delta"] < 1),
        ("tau", 0 < o["tau"] < 1), ("batch_size", o["batch_size"] >= 1),
        ("beam_size", o["beam_size"] >= 1), ("coverage_samples", o["coverage_samples"] >= 1),
        ("n_segments", o["n_segments"] >= 1), ("examples", o["examples"] >= 0),
        ("max_anchor_size", o["max_anchor_size"] is None or o["max_anchor_size"] >= 1)) if not ok]
    if bad:
        raise OptionError(f"anchor needs 0 < threshold <= 1, 0 < delta < 1, 0 < tau < 1 and "
                          f"positive counts; got {', '.join(bad)}")
    check_segmentation(o["segmentation"], "anchor")
    return o


class Anchors(Method):
    name = "anchor"
    aliases = ("anchors",)
    needs = frozenset({"forward"})
    signed = False
    defaults = {"threshold": 0.95, "delta": 0.1, "tau": 0.15, "batch_size": 100,
                                "beam_size": 1, "coverage_samples": 10000, "max_anchor_size": None,
                                "segmentation": "quickshift", "n_segments": 50, "seed": 0,
                                "fill": "superpixel_mean", "examples": 5}
    description = "superpixels that keep the prediction with high precision (Ribeiro et al. 2018)"

    def run(self, engine, x, targets, logits, opts, shared):
        o = _checked(opts)
        n, c, h, w = x.shape
        maps = np.zeros((n, h, w), np.float32)
        segs = np.zeros((n, h, w), np.int64)
        fills = np.zeros_like(x)
        results = []
        for i in range(n):
            seg = superpixels(x[i], o["segmentation"], o["n_segments"], None, o["seed"])
            fill = fills[i] = superpixel_fill(x[i], seg, o["fill"], "anchor")
            rng = np.random.default_rng(o["seed"])
            sampler = _Sampler(engine, x[i], seg, fill, targets[i], rng, o["examples"])
            cover = rng.random((o["coverage_samples"], sampler.k)) < 0.5
            res = anchor_search(sampler, cover, o)
            res["evaluations"], res["engine_calls"] = sampler.evaluations, sampler.calls
            maps[i] = np.isin(seg, res["anchor"])
            segs[i] = seg
            results.append(res)
        info = {"segments": segs, "fill": fills, "anchors": [r["anchor"] for r in results],
                "precision": np.array([r["precision"] for r in results]),
                "bounds": np.array([r["bounds"] for r in results]).reshape(n, 2),
                "coverage": np.array([r["coverage"] for r in results]),
                "met_threshold": np.array([r["met_threshold"] for r in results]),
                "evaluations": np.array([r["evaluations"] for r in results]),
                "engine_calls": np.array([r["engine_calls"] for r in results]),
                "anchor_samples": np.array([r["samples"] for r in results]),
                "examples": [r["examples"] for r in results], "seed": o["seed"],
                "threshold": o["threshold"], "tau": o["tau"]}
        return Maps(self.name, maps, targets, False, None, logits, info)

    def explanation(self, maps, i, labels=None):
        info = maps.info
        anchor = [int(a) for a in info["anchors"][i]]
        t = int(maps.targets[i])
        cls = class_label(t, labels)
        body = " AND ".join(f"s{a} kept" for a in anchor) or "always"
        lb, ub = (float(v) for v in info["bounds"][i])
        ex = info["examples"][i]
        return {"target": t,
                "rule": {"text": f"{body} -> {cls}", "premises": [{"superpixel": a, "kept": True} for a in anchor],
                         "class": t},
                "anchor": anchor, "precision": float(info["precision"][i]), "precision_bounds": [lb, ub],
                "coverage": float(info["coverage"][i]), "met_threshold": bool(info["met_threshold"][i]),
                "threshold": float(info["threshold"]), "tau": float(info["tau"]),
                "superpixels": int(info["segments"][i].max()) + 1,
                "examples": {"positive": int(len(ex["positive"])), "negative": int(len(ex["negative"])),
                             "negative_class": [int(c) for c in ex["negative_class"]]},
                "anchor_samples": int(info["anchor_samples"][i]), "evaluations": int(info["evaluations"][i]),
                "engine_calls": int(info["engine_calls"][i]), "seed": info["seed"]}

    def explanation_arrays(self, maps, i):
        ex = maps.info["examples"][i]
        return {"segments": maps.info["segments"][i].astype(np.int32), "examples_positive": ex["positive"],
                "examples_negative": ex["negative"], "examples_negative_class": ex["negative_class"]}

    def explanation_pictures(self, maps, i, image, labels=None):
        from ..overlays import Picture

        seg, fill = maps.info["segments"][i], maps.info["fill"][i]
        e = self.explanation(maps, i, labels)
        region = maps.maps[i] > 0
        pics = [Picture(f"anchor: {e['rule']['text']}\nprecision {e['precision']:.2f}, coverage "
                        f"{e['coverage']:.2f}", image, region),
                Picture("anchor kept, the rest filled", np.where(region[None], image, fill), region)]
        ex = maps.info["examples"][i]
        for z, c in list(zip(ex["negative"], ex["negative_class"]))[:2]:
            name = f"{int(c)} ({labels[int(c)]})" if labels and int(c) < len(labels) else str(int(c))
            pics.append(Picture(f"covered sample, model -> {name}", np.where(z[seg][None], image, fill), region))
        return pics
