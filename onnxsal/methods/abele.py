"""ABELE (Guidotti, Monreale, Matwin and Pedreschi, ECML-PKDD 2019, "Black Box Explanation by
Learning Image Exemplars in the Latent Feature Space"), forward passes only.

An adversarial autoencoder (``--autoencoder DIR``, :mod:`onnxsal.autoencoder`) maps the image
x to a latent code z0. ABELE builds a neighbourhood of latent codes around z0 (random draws
around z0 and two genetic populations, one evolving towards codes the black box labels like
x and one towards other labels; only codes the latent discriminator accepts are kept; the
smaller side is topped up so that each side is a share of the neighbourhood), labels every
code by the black box on its decoded image, fits a scikit-learn decision tree in the latent
space, and reads off the factual rule (the tree path of z0) and the counterfactual rules (the
paths to leaves of another class that change the fewest conditions, each checked by the
model on the decoded minimal change). Exemplars are codes drawn from the prior inside the
factual rule's box whose decoded image keeps the black-box label; counter-exemplars are drawn
inside a counterfactual rule's box and change it. Both are checked by running the model. The
saliency map is the median over the exemplars of the difference x - exemplar, scaled to 8-bit
levels with a neutral band (the paper's knee-point rule) set to 0. Design and defaults:
docs/abele.md.

Every step's decoded images go to ``engine.logits`` as one batch: one call for the random
draws, one per genetic generation (both populations together), one per balancing, checking
or exemplar round.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError
from .base import Maps, Method, class_label

Box = tuple[np.ndarray, np.ndarray]  # (lo, hi): the rule holds where lo < z <= hi


def neuclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ABELE's normalised Euclidean distance per row: 0.5 var(a - b) / (var(a) + var(b))."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    den = a.var(axis=1) + b.var(axis=1)
    num = 0.5 * (a - b).var(axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _sigmoid(x, x0: float = 0.5, k: float = 10.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-k * (np.asarray(x, np.float64) - x0)))


def knee_index(values: np.ndarray) -> int:
    """The index of the point of ``values`` (a curve over 0..n-1) farthest from the chord
    between its first and last points (the knee)."""
    y = np.asarray(values, np.float64)
    if len(y) < 3:
        return 0
    x = np.arange(len(y), dtype=np.float64)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    d = np.abs(dy * (x - x[0]) - dx * (y - y[0])) / np.hypot(dx, dy)
    return int(np.argmax(d))


def banded_difference(image: np.ndarray, exemplar: np.ndarray) -> np.ndarray:
    """image - exemplar (mean over channels) as 8-bit levels 0..255 centred at 127.5 (scaled
    by the largest |difference|, so that no difference stays at the centre), with the neutral
    band set to 127.5: the levels within |127.5 - t| of the centre, where t is the level at
    the knee of the log level frequencies (most frequent first), as in ABELE's code."""
    d = (image.astype(np.float64) - exemplar.astype(np.float64)).mean(axis=0)
    m = float(np.abs(d).max())
    lev = np.full(d.shape, 127.5) if m == 0 else np.round(d / m * 127.5 + 127.5)
    values, counts = np.unique(lev, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    t = values[order][knee_index(np.log(counts[order]))]
    gap = abs(127.5 - t)
    return np.where(np.abs(lev - 127.5) <= gap, 127.5, lev)


def saliency(image: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
    """ABELE's map in [-1, 1]: the median over exemplars of the banded differences, centred.
    Positive: the image is brighter there than the exemplars (what the label rests on)."""
    if len(exemplars) == 0:
        return np.zeros(image.shape[1:], np.float32)
    med = np.median(np.stack([banded_difference(image, e) for e in exemplars]), axis=0)
    return ((med - 127.5) / 127.5).astype(np.float32)


class _BlackBox:
    """The model's labels of decoded latent codes, with a tally of evaluations and calls."""

    def __init__(self, engine, ae):
        self.engine, self.ae = engine, ae
        self.evaluations = 0
        self.calls = 0

    def images(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0, np.int64)
        self.evaluations += len(images)
        self.calls += 1
        return np.asarray(self.engine.logits(images)).argmax(axis=1).astype(np.int64)

    def codes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, decoded images) of codes z, in one engine call."""
        dec = self.ae.decode(z)
        return self.images(dec), dec


def _accepted(ae, z: np.ndarray, thr: float) -> np.ndarray:
    return ae.discriminate(z) > thr if thr > 0 else np.ones(len(z), bool)


class _Genetic:
    """Two populations evolved together (DEAP's eaSimple as ABELE runs it): tournament
    selection, two-point crossover, mutation by prior draws; fitness = alpha1 * similarity to
    z0 + alpha2 * (same label as x, or different); codes the discriminator rejects score 0."""

    def __init__(self, z0, target, bb, ae, rng, o):
        self.z0, self.target, self.bb, self.ae, self.rng, self.o = z0, target, bb, ae, rng, o

    def fitness(self, z: np.ndarray, labels: np.ndarray, same: bool) -> np.ndarray:
        o = self.o
        sim_score = 1.0 - neuclidean(z, self.z0[None])
        sim = np.where(sim_score < 1.0, _sigmoid(sim_score), 0.0) if same else _sigmoid(sim_score)
        hit = (labels == self.target).astype(np.float64)
        lab = _sigmoid(hit) if same else 1.0 - _sigmoid(hit)
        f = o["alpha1"] * sim + o["alpha2"] * lab
        return np.where(_accepted(self.ae, z, o["discriminator_threshold"]), f, 0.0)

    def _vary(self, pop: np.ndarray, fit: np.ndarray) -> np.ndarray:
        rng, o = self.rng, self.o
        n, L = pop.shape
        cand = rng.integers(0, n, (n, o["tournament"]))
        off = pop[cand[np.arange(n), np.argmax(fit[cand], axis=1)]].copy()
        for i in range(0, n - 1, 2):
            if rng.random() < o["crossover"] and L > 1:
                a, b = sorted(rng.choice(np.arange(1, L + 1), 2, replace=L < 2))
                off[[i, i + 1], a:b] = off[[i + 1, i], a:b]
        mutate = rng.random(n) < o["mutation"]
        mask = (rng.random((n, L)) < o["mutation"]) & mutate[:, None]
        return np.where(mask, rng.standard_normal((n, L)), off)

    def run(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, labels) of both final populations and the hall of fame above the gap."""
        L = len(self.z0)
        pops = [np.repeat(self.z0[None], size, 0), np.repeat(self.z0[None], size, 0)]
        lab0, _ = self.bb.codes(self.z0[None])
        labs = [np.repeat(lab0, size), np.repeat(lab0, size)]
        fits = [self.fitness(pops[k], labs[k], k == 0) for k in range(2)]
        hof: list[list[tuple[float, bytes, np.ndarray, int]]] = [[], []]
        for _ in range(self.o["generations"]):
            offs = [self._vary(pops[k], fits[k]) for k in range(2)]
            lab_all, _ = self.bb.codes(np.concatenate(offs))  # one call per generation
            labs = [lab_all[:size], lab_all[size:]]
            pops = offs
            fits = [self.fitness(pops[k], labs[k], k == 0) for k in range(2)]
            for k in range(2):
                hof[k] = self._hall(hof[k], pops[k], labs[k], fits[k], size)
        zs, ys = [], []
        for k in range(2):
            zs.append(pops[k])
            ys.append(labs[k])
            f = np.sort(fits[k])
            if len(f) > 1 and hof[k]:
                gaps = np.diff(f)
                thr = f[int(np.flatnonzero(gaps == gaps.max()).max())]
                keep = [(z, y) for fv, _, z, y in hof[k] if fv > thr]
                if keep:
                    zs.append(np.stack([z for z, _ in keep]))
                    ys.append(np.array([y for _, y in keep], np.int64))
        return np.concatenate(zs).reshape(-1, L), np.concatenate(ys)

    def _hall(self, hof, pop, labs, fit, size):
        k = max(1, int(round(size * self.o["halloffame_ratio"])))
        known = {key for _, key, _, _ in hof}
        for z, y, f in zip(pop, labs, fit, strict=True):
            key = z.tobytes()
            if key not in known:
                hof.append((float(f), key, z.copy(), int(y)))
                known.add(key)
        hof.sort(key=lambda t: -t[0])
        return hof[:k]


def neighbourhood(z0, target, label0, bb, ae, rng, o) -> dict[str, Any]:
    """The labelled latent neighbourhood (z0 first, labelled by the model on x itself)."""
    L = len(z0)
    thr = o["discriminator_threshold"]
    n_rand = o["samples"] // 2
    draws, tried = [], 0
    for _ in range(o["rounds"]):  # random codes around z0, discriminator-accepted
        z = z0 + o["radius"] * rng.standard_normal((n_rand, L))
        tried += len(z)
        draws.append(z[_accepted(ae, z, thr)])
        if sum(len(d) for d in draws) >= n_rand:
            break
    zr = np.concatenate(draws)[:n_rand]
    yr, _ = bb.codes(zr)
    zg, yg = _Genetic(z0, target, bb, ae, rng, o).run(max(2, (o["samples"] - n_rand) // 2))
    acc = _accepted(ae, zg, thr)
    Z = np.concatenate([z0[None], zr, zg[acc]])
    Y = np.concatenate([[label0], yr, yg[acc]]).astype(np.int64)
    # balance: each side (the explained label, the others) at least `balance` of the whole
    topped = {"same": 0, "other": 0}
    for side in ("same", "other"):
        for _ in range(o["rounds"]):
            have = int((Y == target).sum()) if side == "same" else int((Y != target).sum())
            need = int(np.ceil(o["balance"] * len(Y))) - have
            if need <= 0:
                break
            scale = o["radius"] / 2 if side == "same" else 1.0
            centre = z0 if side == "same" else np.zeros(L)
            z = centre + scale * rng.standard_normal((max(4 * need, 50), L))
            z = z[_accepted(ae, z, thr)]
            y, _ = bb.codes(z)
            ok = (y == target) if side == "same" else (y != target)
            Z, Y = np.concatenate([Z, z[ok][:need]]), np.concatenate([Y, y[ok][:need]])
            topped[side] += int(min(need, ok.sum()))
    return {"Z": Z, "Y": Y, "random_tried": tried, "random_kept": len(zr),
            "genetic": int(len(zg)), "genetic_kept": int(acc.sum()), "topped_up": topped}


# -- the tree and its rules -------------------------------------------------------------------

def leaf_boxes(tree, L: int) -> dict[int, Box]:
    """{leaf id: (lo, hi)}: the region of each leaf of a fitted scikit-learn tree."""
    t = tree.tree_
    out: dict[int, Box] = {}
    stack = [(0, np.full(L, -np.inf), np.full(L, np.inf))]
    while stack:
        node, lo, hi = stack.pop()
        left, right = t.children_left[node], t.children_right[node]
        if left == right:
            out[int(node)] = (lo, hi)
            continue
        f, thr = int(t.feature[node]), float(t.threshold[node])
        hl, lr = hi.copy(), lo.copy()
        hl[f] = min(hi[f], thr)
        lr[f] = max(lo[f], thr)
        stack.append((left, lo, hl))
        stack.append((right, lr, hi))
    return out


def premises(box: Box) -> list[dict[str, Any]]:
    lo, hi = box
    out = []
    for f in range(len(lo)):
        if np.isfinite(lo[f]):
            out.append({"feature": f, "op": ">", "threshold": float(lo[f])})
        if np.isfinite(hi[f]):
            out.append({"feature": f, "op": "<=", "threshold": float(hi[f])})
    return out


def rule_text(prem: list[dict[str, Any]], cls: int, labels: list[str] | None = None) -> str:
    body = " AND ".join(f"z{p['feature']} {p['op']} {p['threshold']:.4g}" for p in prem) or "always"
    return f"{body} -> {class_label(cls, labels)}"


def covers(box: Box, z: np.ndarray) -> np.ndarray:
    """Which rows of z satisfy the rule of ``box``."""
    lo, hi = box
    z = np.atleast_2d(z)
    return np.asarray(((z > lo) & (z <= hi)).all(axis=1))


def changed(box: Box, z0: np.ndarray) -> list[dict[str, Any]]:
    """The conditions of ``box`` that z0 violates (the counterfactual's delta)."""
    return [p for p in premises(box)
            if not (z0[p["feature"]] > p["threshold"] if p["op"] == ">" else z0[p["feature"]] <= p["threshold"])]


def minimal_change(box: Box, z0: np.ndarray, eps: float) -> np.ndarray:
    """z0 with each violated feature moved just inside the box (by eps, as ABELE)."""
    lo, hi = box
    z = z0.astype(np.float64).copy()
    for f in range(len(z)):
        if lo[f] < z[f] <= hi[f]:
            continue
        width = hi[f] - lo[f]
        step = min(eps, width / 2) if np.isfinite(width) else eps
        z[f] = lo[f] + step if z[f] <= lo[f] else hi[f] - step
    return z


def draw_in_box(box: Box, n: int, rng) -> np.ndarray:
    """n draws of the standard normal prior conditioned on the box (inverse-CDF sampling of
    the truncated normal, feature by feature): ABELE's rejection sampling without the waste."""
    from scipy.special import ndtr, ndtri

    lo, hi = box
    a, b = ndtr(lo), ndtr(hi)
    u = a + (b - a) * rng.random((n, len(lo)))
    z = ndtri(np.clip(u, 1e-12, 1 - 1e-12))
    return np.clip(z, np.nextafter(lo, np.inf), hi)


def _weights(Z: np.ndarray) -> np.ndarray:
    """ABELE's kernel weights: sqrt(exp(-d^2 / w^2)), d the distance to z0 of min-max scaled
    codes, w = 0.75 sqrt(L)."""
    span = Z.max() - Z.min()
    Zn = (Z - Z.min()) / span if span > 0 else Z
    d = np.linalg.norm(Zn - Zn[0], axis=1)
    w = 0.75 * np.sqrt(Z.shape[1])
    return np.sqrt(np.exp(-(d ** 2) / w ** 2))


def counterfactuals(tree, boxes, z0, target, factual: int, bb, o) -> list[dict[str, Any]]:
    """The counterfactual rules: leaves other than z0's whose class is not the explained
    label, fewest violated conditions first; the first level at which the model confirms one
    (its decoded minimal change gets another label) is returned, every rule of it with its
    check."""
    cls = tree.classes_[tree.tree_.value[:, 0].argmax(axis=1)]
    cands = [(len(changed(b, z0)), leaf, b) for leaf, b in boxes.items()
             if int(cls[leaf]) != target and leaf != factual]
    for level in sorted({c[0] for c in cands}):
        group = [(leaf, b) for n, leaf, b in cands if n == level][:o["max_counterfactuals"]]
        zs = np.stack([minimal_change(b, z0, o["eps"]) for _, b in group])
        y, _ = bb.codes(zs)
        out = [{"leaf": int(leaf), "class": int(cls[leaf]), "box": b, "premises": premises(b),
                "delta": changed(b, z0), "minimal_change": zs[j], "model_label": int(y[j]),
                "changes_prediction": bool(y[j] != target)}
               for j, (leaf, b) in enumerate(group)]
        if any(c["changes_prediction"] for c in out):
            return out
    return []


def sample_exemplars(boxes: list[Box], keep_label: bool, target: int, n: int, bb, ae, rng, o,
                     seeds: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Up to n decoded codes drawn inside the boxes (round robin) whose model label is
    ``target`` (keep_label) or not; the seeds (minimal changes) are tried first."""
    thr = o["discriminator_threshold"]
    lat: list[np.ndarray] = []
    img: list[np.ndarray] = []
    lab: list[int] = []
    rule: list[int] = []
    tried = hits = 0
    for r in range(o["rounds"]):
        if len(lat) >= n or not boxes:
            break
        per = max(1, o["exemplar_batch"] // len(boxes))
        z = np.concatenate([draw_in_box(b, per, rng) for b in boxes])
        which = np.repeat(np.arange(len(boxes)), per)
        if r == 0 and seeds:
            z, which = np.concatenate([np.stack(seeds), z]), np.concatenate([np.arange(len(seeds)), which])
        ok = _accepted(ae, z, thr)
        z, which = z[ok], which[ok]
        y, dec = bb.codes(z)
        tried += len(z)
        good = (y == target) if keep_label else (y != target)
        hits += int(good.sum())
        for j in np.flatnonzero(good)[:n - len(lat)]:
            lat.append(z[j])
            img.append(dec[j])
            lab.append(int(y[j]))
            rule.append(int(which[j]))
    shape = (0, ae.latent)
    return {"latent": np.array(lat, np.float32).reshape(shape if not lat else (len(lat), -1)),
            "images": np.array(img, np.float32).reshape((len(img),) + tuple(ae.input_shape)),
            "labels": np.array(lab, np.int64), "rule": np.array(rule, np.int64), "tried": tried,
            "hit_rate": hits / tried if tried else None}


def _checked(opts: dict[str, Any]) -> dict[str, Any]:
    o = dict(opts)
    if o["autoencoder"] is None or (isinstance(o["autoencoder"], str) and not o["autoencoder"].strip()):
        raise OptionError("abele needs an adversarial autoencoder: --autoencoder DIR (make one with "
                          "`onnxsal train-autoencoder`; docs/abele.md)")
    ints = ("samples", "generations", "tournament", "exemplars", "counter_exemplars",
            "max_counterfactuals", "exemplar_batch", "rounds", "seed", "min_samples_leaf")
    floats = ("radius", "alpha1", "alpha2", "mutation", "crossover", "halloffame_ratio",
              "discriminator_threshold", "balance", "eps")
    try:
        for k in ints:
            o[k] = int(o[k])
        for k in floats:
            o[k] = float(o[k])
        if o["max_depth"] is not None:
            o["max_depth"] = int(o["max_depth"])
    except (TypeError, ValueError):
        raise OptionError(f"abele options {', '.join(ints)} and max_depth must be integers and "
                          f"{', '.join(floats)} numbers") from None
    bad = [f"{k}={o[k]!r}" for k, ok in (
        ("samples", o["samples"] >= 10), ("generations", o["generations"] >= 0),
        ("tournament", o["tournament"] >= 1), ("exemplars", o["exemplars"] >= 1),
        ("counter_exemplars", o["counter_exemplars"] >= 0), ("max_counterfactuals", o["max_counterfactuals"] >= 1),
        ("exemplar_batch", o["exemplar_batch"] >= 1), ("rounds", o["rounds"] >= 1),
        ("seed", o["seed"] >= 0), ("min_samples_leaf", o["min_samples_leaf"] >= 1),
        ("radius", o["radius"] > 0), ("mutation", 0 <= o["mutation"] <= 1),
        ("crossover", 0 <= o["crossover"] <= 1), ("halloffame_ratio", 0 <= o["halloffame_ratio"] <= 1),
        ("discriminator_threshold", 0 <= o["discriminator_threshold"] < 1), ("balance", 0 <= o["balance"] <= 0.5),
        ("eps", o["eps"] > 0), ("alpha1", o["alpha1"] >= 0), ("alpha2", o["alpha2"] >= 0),
        ("max_depth", o["max_depth"] is None or o["max_depth"] >= 1)) if not ok]
    if bad:
        raise OptionError(f"abele: invalid options {', '.join(bad)} (docs/abele.md#options)")
    return o


_LOADED: dict[tuple, tuple[tuple, Any]] = {}  # (folder, threads) -> (its files' stamp, Autoencoder)


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in folder.iterdir()
                        for st in [p.lstat()]))


def _load(ae, engine, threads):
    """The checked autoencoder; a folder is read and checked once per process while its files
    stay as they are (methods run once per batch)."""
    from ..autoencoder import Autoencoder, load_autoencoder

    if isinstance(ae, Autoencoder):
        out = ae
    else:
        folder = Path(str(ae))
        key = (str(folder.resolve()) if folder.is_dir() else str(ae), threads)
        stamp = _stamp(folder) if folder.is_dir() else ()
        hit = _LOADED.get(key)
        if hit is not None and stamp and hit[0] == stamp:
            out = hit[1]
        else:
            out = load_autoencoder(ae, threads=threads)
            if stamp:
                _LOADED[key] = (stamp, out)
    if tuple(out.input_shape) != tuple(engine.input_shape):
        raise OptionError(f"--autoencoder {out.path}: it takes images {list(out.input_shape)}, the "
                          f"model {list(engine.input_shape)} (train one at the model's input size: "
                          "`onnxsal train-autoencoder --model MODEL`)")
    return out


def explain_one(engine, ae, image: np.ndarray, target: int, o: dict[str, Any]) -> dict[str, Any]:
    """ABELE's explanation of one image (see the module docstring); JSON-ready parts and
    arrays."""
    from sklearn.tree import DecisionTreeClassifier

    t0 = time.perf_counter()
    rng = np.random.default_rng(o["seed"])
    bb = _BlackBox(engine, ae)
    label0 = int(bb.images(image[None])[0])
    z0 = ae.encode(image[None])[0].astype(np.float64)
    recon = ae.decode(z0[None])[0]
    nb = neighbourhood(z0, target, label0, bb, ae, rng, o)
    Z, Y = nb["Z"], nb["Y"]
    w = _weights(Z)
    tree = DecisionTreeClassifier(random_state=o["seed"], max_depth=o["max_depth"],
                                  min_samples_leaf=o["min_samples_leaf"]).fit(Z, Y, sample_weight=w)
    pred = tree.predict(Z)
    boxes = leaf_boxes(tree, Z.shape[1])
    leaf = int(tree.apply(z0[None])[0])
    fbox = boxes[leaf]
    fclass = int(pred[0])
    cfs = counterfactuals(tree, boxes, z0, target, leaf, bb, o)
    ex = sample_exemplars([fbox], True, target, o["exemplars"], bb, ae, rng, o)
    valid = [j for j, c in enumerate(cfs) if c["changes_prediction"]]
    cex = None
    if valid and o["counter_exemplars"]:
        cex = sample_exemplars([cfs[j]["box"] for j in valid], False, target, o["counter_exemplars"], bb,
                               ae, rng, o, seeds=[cfs[j]["minimal_change"] for j in valid])
        cex["rule"] = np.array(valid, np.int64)[cex["rule"]]  # the index in "counterfactuals"
    smap = saliency(image, ex["images"])
    return {
        "target": int(target), "model_label": label0, "latent": z0.tolist(),
        "reconstruction": {"mse": float(((recon - image) ** 2).mean()),
                           "model_label": int(bb.images(recon[None])[0]),
                           "discriminator": float(ae.discriminate(z0[None])[0])},
        "rule": {"premises": premises(fbox), "class": fclass, "leaf": leaf,
                 "holds_for_image": bool(covers(fbox, z0)[0])},
        "counterfactuals": [{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                             for k, v in c.items() if k != "box"} for c in cfs],
        "fidelity": float((pred == Y).mean()), "fidelity_weighted": float(tree.score(Z, Y, sample_weight=w)),
        "neighbourhood": {"size": int(len(Z)), "same_label": int((Y == target).sum()),
                          "other_label": int((Y != target).sum()),
                          "classes": {str(int(c)): int(n) for c, n in zip(*np.unique(Y, return_counts=True),
                                                                            strict=True)},
                          "random_tried": nb["random_tried"], "random_kept": nb["random_kept"],
                          "genetic": nb["genetic"], "genetic_kept": nb["genetic_kept"],
                          "topped_up": nb["topped_up"]},
        "tree": {"depth": int(tree.get_depth()), "leaves": int(tree.get_n_leaves())},
        "exemplars": ex, "counter_exemplars": cex, "map": smap, "reconstructed": recon,
        "evaluations": bb.evaluations, "engine_calls": bb.calls, "seconds": time.perf_counter() - t0,
    }


def _json_examples(e: dict | None) -> dict[str, Any]:
    if e is None:
        return {"count": 0, "model_labels": [], "latent": [], "rule": [], "tried": 0, "hit_rate": None}
    return {"count": int(len(e["labels"])), "model_labels": e["labels"].tolist(),
            "latent": e["latent"].round(6).tolist(), "rule": e["rule"].tolist(), "tried": int(e["tried"]),
            "hit_rate": e["hit_rate"]}


class Abele(Method):
    name = "abele"
    needs = frozenset({"forward"})
    signed = True
    in_all = False  # it needs --autoencoder
    defaults = {"autoencoder": None, "samples": 1000, "radius": 1.0, "generations": 10,
                "mutation": 0.5, "crossover": 0.7, "tournament": 3, "halloffame_ratio": 0.1,
                "alpha1": 0.5, "alpha2": 0.5, "discriminator_threshold": 0.5, "balance": 0.25,
                "max_depth": None, "min_samples_leaf": 1, "eps": 0.01, "exemplars": 10,
                "counter_exemplars": 5, "max_counterfactuals": 5, "exemplar_batch": 200,
                "rounds": 10, "seed": 0, "threads": 1}
    description = ("exemplars, counter-exemplars and a latent rule from an adversarial "
                   "autoencoder (Guidotti et al. 2019)")

    def run(self, engine, x, targets, logits, opts, shared):
        o = _checked(opts)
        ae = _load(o["autoencoder"], engine, o["threads"])
        n, _, h, w = x.shape
        maps = np.zeros((n, h, w), np.float32)
        res = [explain_one(engine, ae, x[i], int(targets[i]), o) for i in range(n)]
        for i, r in enumerate(res):
            maps[i] = r["map"]
        explanations = []
        for r in res:
            e = {k: v for k, v in r.items() if k not in ("exemplars", "counter_exemplars", "map", "reconstructed")}
            e["rule"]["text"] = rule_text(e["rule"]["premises"], e["rule"]["class"], engine.labels)
            for c in e["counterfactuals"]:
                c["text"] = rule_text(c["premises"], c["class"], engine.labels)
            e["exemplars"] = _json_examples(r["exemplars"])
            e["counter_exemplars"] = _json_examples(r["counter_exemplars"])
            e["autoencoder"] = ae.describe()
            e["seed"] = o["seed"]
            explanations.append(e)
        empty = np.zeros((0,) + tuple(ae.input_shape), np.float32)
        info = {"explanations": explanations,
                "exemplars": [r["exemplars"]["images"] for r in res],
                "exemplar_labels": [r["exemplars"]["labels"] for r in res],
                "counter_exemplars": [r["counter_exemplars"]["images"] if r["counter_exemplars"] else empty
                                      for r in res],
                "counter_exemplar_labels": [r["counter_exemplars"]["labels"] if r["counter_exemplars"]
                                            else np.zeros(0, np.int64) for r in res],
                "reconstructions": np.stack([r["reconstructed"] for r in res]),
                "latents": np.array([r["latent"] for r in res], np.float32),
                "fidelity": np.array([r["fidelity"] for r in res]),
                "evaluations": np.array([r["evaluations"] for r in res]),
                "engine_calls": np.array([r["engine_calls"] for r in res]),
                "seconds": np.array([r["seconds"] for r in res]), "seed": o["seed"]}
        return Maps(self.name, maps, targets, True, None, logits, info)

    # hooks of the structured-explanation writer (explanations.json, maps.npz arrays)
    def explanation(self, maps: Maps, i: int, labels: list[str] | None = None) -> dict[str, Any] | None:
        return maps.info["explanations"][i]

    def explanation_arrays(self, maps: Maps, i: int) -> dict[str, np.ndarray]:
        info = maps.info
        return {"exemplars": info["exemplars"][i], "exemplar_labels": info["exemplar_labels"][i],
                "counter_exemplars": info["counter_exemplars"][i],
                "counter_exemplar_labels": info["counter_exemplar_labels"][i],
                "reconstruction": info["reconstructions"][i], "latent": info["latents"][i]}

    def explanation_pictures(self, maps: Maps, i: int, image: np.ndarray,
                             labels: list[str] | None = None) -> list:
        """The image (its map's non-neutral pixels outlined, the rule in the title), the map as
        an image, the reconstruction, up to three exemplars and three counter-exemplars, each
        titled with the model's label."""
        import importlib

        picture = importlib.import_module("onnxsal.overlays").Picture
        info, e = maps.info, maps.info["explanations"][i]

        body, _, head = e["rule"]["text"].rpartition(" -> ")
        conds = body.split(" AND ")
        rule = "\n".join(" AND ".join(conds[k:k + 2]) for k in range(0, len(conds), 2))
        smap = np.repeat(((maps.maps[i] + 1) / 2)[None], image.shape[0], 0)
        pics = [picture(f"abele: {rule}\n-> {head}, fidelity {e['fidelity']:.2f}", image, maps.maps[i] != 0),
                picture("saliency (grey 0, white image brighter than the exemplars)", smap, None),
                picture(f"reconstruction, model -> {class_label(e['reconstruction']['model_label'], labels)}",
                        info["reconstructions"][i], None)]
        for kind, key in (("exemplar", "exemplars"), ("counter-exemplar", "counter_exemplars")):
            for im, c in list(zip(info[key][i], info[key[:-1] + "_labels"][i], strict=True))[:3]:
                pics.append(picture(f"{kind}, model -> {class_label(int(c), labels)}", im, None))
        return pics
