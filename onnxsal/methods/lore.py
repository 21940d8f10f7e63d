"""LORE for images (Guidotti, Monreale, Ruggieri, Pedreschi, Turini, Giannotti 2018, "Local
Rule-Based Explanations of Black Box Decision Systems"), over superpixels, forward passes only.

The image's features are its S superpixels, z in {0, 1}^S (1 kept, 0 replaced by its fill, as
for anchors; the image itself is z = 1). Two genetic algorithms grow a neighbourhood around
it: one rewards samples that keep the explained outcome, one samples that change it; both
reward closeness to the image (fitness = outcome term + 1 - Hamming distance - [z is the
image]). A scikit-learn decision tree fitted on the neighbourhood gives the factual rule (the
path the image follows) and counterfactual rules (leaves of another class, fewest conditions
the image does not meet first); each counterfactual is rendered and run through the model,
and marked valid when the model's class really changes. Design and defaults: docs/lore.md.

Every generation's new individuals (of both algorithms) go to ``engine.logits`` in one batch;
a genome already evaluated is not evaluated again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import OnnxsalError, OptionError
from .base import Maps, Method, class_label
from .superpixel import SuperpixelImage, check_segmentation, superpixel_fill, superpixels

_INTS = ("population", "generations", "tournament", "counterfactuals", "n_segments", "seed")
_PROBS = ("crossover", "mutation", "gene_mutation")


class _Evaluator:
    """The model's class per genome, evaluated in batches; with ``remember`` (the default) a
    genome is evaluated once, without it every row given is evaluated (as the reference code
    evaluates every individual whose fitness is invalid)."""

    def __init__(self, features: SuperpixelImage, remember: bool = True):
        self.features, self.remember = features, remember
        self.known: dict[bytes, int] = {}

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if not self.remember:
            return self.features.predict(z)
        keys = [row.tobytes() for row in np.packbits(z, axis=1)]
        todo: dict[bytes, int] = {}
        for j, key in enumerate(keys):
            if key not in self.known and key not in todo:
                todo[key] = j
        if todo:
            classes = self.features.predict(z[list(todo.values())])  # one batch
            self.known.update(zip(todo, classes.tolist()))
        return np.array([self.known[k] for k in keys], np.int64)


def fitness(z: np.ndarray, classes: np.ndarray, target: int, same: bool) -> np.ndarray:
    """The paper's fitness of each row of z around the image z = 1: [outcome term] +
    (1 - normalised Hamming distance to the image) - [z is the image]; the outcome term is
    [class == target] for the same-outcome population, [class != target] for the other."""
    d = 1.0 - z.mean(axis=1)
    hit = (classes == target) if same else (classes != target)
    return hit.astype(np.float64) + (1.0 - d) - (d == 0)


def _tournament(rng, fit: np.ndarray, size: int) -> np.ndarray:
    """Indices of len(fit) winners, each the fittest of ``size`` drawn with replacement."""
    draw = rng.integers(0, len(fit), (len(fit), size))
    return draw[np.arange(len(fit)), fit[draw].argmax(axis=1)]


def _vary(rng, z: np.ndarray, o: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Two-point crossover of consecutive pairs (probability ``crossover``), then mutation of
    each individual (probability ``mutation``: each gene redrawn from {0, 1} with probability
    ``gene_mutation``). Returns the offspring and which of them were mated or mutated."""
    z = z.copy()
    p, k = z.shape
    pairs = p // 2
    touched = np.zeros(p, bool)
    if k >= 2 and pairs:
        mate = rng.random(pairs) < o["crossover"]
        first = rng.integers(1, k + 1, pairs)  # two distinct cut points in 1..k (as DEAP's cxTwoPoint)
        second = rng.integers(1, k, pairs)
        second = np.where(second >= first, second + 1, second)
        cuts = np.sort(np.stack([first, second], axis=1), axis=1)
        cols = np.arange(k)
        swap = mate[:, None] & (cols >= cuts[:, :1]) & (cols < cuts[:, 1:])
        a, b = z[0:2 * pairs:2], z[1:2 * pairs:2]
        z[0:2 * pairs:2], z[1:2 * pairs:2] = np.where(swap, b, a), np.where(swap, a, b)
        touched[0:2 * pairs:2] = touched[1:2 * pairs:2] = mate
    chosen = rng.random(p) < o["mutation"]
    mutate = chosen[:, None] & (rng.random((p, k)) < o["gene_mutation"])
    return np.where(mutate, rng.random((p, k)) < 0.5, z), touched | chosen


def genetic_neighbourhood(evaluate: _Evaluator, k: int, target: int, rng, o: dict[str, Any]
                          ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(Z [n, k] bool, the model's class of each row, new evaluations per generation): the
    final populations of the same- and different-outcome algorithms (``population`` / 2 each,
    both started from copies of the image) and the image, duplicates dropped. Each
    generation's mated or mutated offspring of both populations are evaluated in one batch
    (the others keep their parent's class)."""
    half = max(1, o["population"] // 2)
    pops = [np.ones((half, k), bool), np.ones((half, k), bool)]
    before = evaluate.features.evaluations
    cls = evaluate(np.ones((1 if evaluate.remember else 2 * half, k), bool))[0]
    classes = [np.full(half, cls), np.full(half, cls)]
    per_generation = [evaluate.features.evaluations - before]
    for _ in range(o["generations"]):
        fits = [fitness(p, c, target, same) for p, c, same in zip(pops, classes, (True, False))]
        picks = [_tournament(rng, f, o["tournament"]) for f in fits]
        varied = [_vary(rng, p[j], o) for p, j in zip(pops, picks)]
        offspring = [v[0] for v in varied]
        changed = np.concatenate([v[1] for v in varied])
        inherited = np.concatenate([c[j] for c, j in zip(classes, picks)])
        before = evaluate.features.evaluations
        both = np.concatenate(offspring)
        inherited[changed] = evaluate(both[changed])  # both populations, one batch
        per_generation.append(evaluate.features.evaluations - before)
        pops, classes = offspring, [inherited[:half], inherited[half:]]
    rows = np.concatenate([np.ones((1, k), bool), *pops])
    labels = np.concatenate([[cls], *classes])
    z, first = np.unique(rows, axis=0, return_index=True)
    return z, labels[first].astype(np.int64), per_generation


def tree_paths(tree) -> dict[int, list[tuple[int, bool]]]:
    """{leaf id: the conditions on its path, as (superpixel, kept)}; a split 'feature <= 0.5'
    sends absent superpixels left."""
    t = tree.tree_
    out: dict[int, list[tuple[int, bool]]] = {}
    stack: list[tuple[int, list[tuple[int, bool]]]] = [(0, [])]
    while stack:
        node, conds = stack.pop()
        left, right = int(t.children_left[node]), int(t.children_right[node])
        if left < 0:
            out[node] = conds
            continue
        f = int(t.feature[node])
        stack.append((right, conds + [(f, True)]))
        stack.append((left, conds + [(f, False)]))
    return out


def _leaf_class(tree, leaf: int) -> int:
    return int(tree.classes_[int(np.argmax(tree.tree_.value[leaf][0]))])


def _fit_tree(z: np.ndarray, y: np.ndarray, o: dict[str, Any]):
    try:
        from sklearn.model_selection import KFold, cross_val_score
        from sklearn.tree import DecisionTreeClassifier
    except ImportError:
        raise OnnxsalError("lore needs scikit-learn: pip install scikit-learn") from None

    tree = DecisionTreeClassifier(max_depth=o["max_depth"], min_samples_leaf=o["min_samples_leaf"],
                                  random_state=o["seed"])
    x = z.astype(np.float32)
    tree.fit(x, y)
    cv = None
    if len(z) >= 10:
        folds = KFold(5, shuffle=True, random_state=o["seed"])
        cv = float(cross_val_score(tree, x, y, cv=folds).mean())
    return tree, float(tree.score(x, y)), cv


def explain_one(features: SuperpixelImage, target: int, rng, o: dict[str, Any]) -> dict[str, Any]:
    """The LORE explanation of one image (docs/lore.md)."""
    k = features.k
    evaluate = _Evaluator(features, o["cache"])
    z, y, per_generation = genetic_neighbourhood(evaluate, k, target, rng, o)
    tree, fid, cv = _fit_tree(z, y, o)
    ones = np.ones((1, k), np.float32)
    paths = tree_paths(tree)
    leaf = int(tree.apply(ones)[0])
    factual = {"premises": [{"superpixel": f, "kept": kept} for f, kept in paths[leaf]],
               "class": _leaf_class(tree, leaf)}
    covered = np.all([z[:, f] == kept for f, kept in paths[leaf]], axis=0) if paths[leaf] else \
        np.ones(len(z), bool)
    factual["coverage"] = float(covered.mean())
    factual["precision"] = float((y[covered] == factual["class"]).mean())
    image_class = int(y[z.all(axis=1)][0])

    def flips(c) -> bool:  # leaves the explained class, or reaches it when the image lacks it
        return (c == target) != (image_class == target)

    cands = []
    for lf, conds in paths.items():
        changes = sorted(f for f, kept in conds if not kept)  # the image keeps every superpixel
        if changes and flips(_leaf_class(tree, lf)):
            cands.append((len(changes), changes, lf, conds))
    cands.sort(key=lambda c: (c[0], c[1], c[2]))
    cands = cands[:o["counterfactuals"]]
    cfs = []
    if cands:
        zc = np.ones((len(cands), k), bool)
        for j, (_, changes, _, _) in enumerate(cands):
            zc[j, changes] = False
        before = features.evaluations
        pred = features.predict(zc)  # every counterfactual checked on the model, one batch
        check_evals = features.evaluations - before
        fewest = cands[0][0]
        for (n, changes, lf, conds), row, p in zip(cands, zc, pred):
            cfs.append({"premises": [{"superpixel": f, "kept": kept} for f, kept in conds],
                        "class": _leaf_class(tree, lf), "changes": changes, "n_changes": n,
                        "minimal": n == fewest, "features": row, "predicted": int(p),
                        "valid": flips(int(p)), "tree_leaf_reached": int(tree.apply(row[None].astype(
                            np.float32))[0]) == lf})
    else:
        check_evals = 0
    return {"factual": factual, "counterfactuals": cfs, "fidelity": fid, "cv_fidelity": cv,
            "hit": factual["class"] == image_class, "image_class": image_class,
            "neighbourhood": int(len(z)), "same_outcome": int((y == target).sum()), "z": z, "y": y,
            "tree_depth": int(tree.get_depth()), "tree_leaves": int(tree.get_n_leaves()),
            "evaluations": features.evaluations, "engine_calls": features.calls,
            "evaluations_per_generation": per_generation, "check_evaluations": check_evals}


def _checked(opts: dict[str, Any]) -> dict[str, Any]:
    """The options as numbers, each checked; a bad one is one OptionError line."""
    o = dict(opts)
    try:
        for key in _INTS:
            o[key] = int(o[key])
        for key in _PROBS:
            o[key] = float(o[key])
        if o["max_depth"] is not None:
            o["max_depth"] = int(o["max_depth"])
        leaf = o["min_samples_leaf"]
        o["min_samples_leaf"] = float(leaf) if isinstance(leaf, float) and not float(leaf).is_integer() \
            else int(leaf)
    except (TypeError, ValueError):
        raise OptionError(f"lore options {', '.join(_INTS)}, max_depth must be integers, "
                          f"{', '.join(_PROBS)} numbers and min_samples_leaf a count or a "
                          "fraction") from None
    bad = [f"{k}={o[k]!r}" for k in _PROBS if not 0 <= o[k] <= 1]
    bad += [f"{k}={o[k]!r}" for k, lo in (("population", 2), ("generations", 0), ("tournament", 1),
                                          ("counterfactuals", 0), ("n_segments", 1)) if o[k] < lo]
    if o["max_depth"] is not None and o["max_depth"] < 1:
        bad.append(f"max_depth={o['max_depth']!r}")
    if not (o["min_samples_leaf"] >= 1 or 0 < o["min_samples_leaf"] < 0.5):
        bad.append(f"min_samples_leaf={o['min_samples_leaf']!r}")
    if bad:
        raise OptionError(f"lore needs probabilities in [0, 1], population >= 2, generations >= 0, "
                          f"tournament >= 1, counterfactuals >= 0, max_depth >= 1; got {', '.join(bad)}")
    if not isinstance(o["cache"], (bool, np.bool_)):
        raise OptionError(f"lore option cache must be true or false, got {o['cache']!r}")
    check_segmentation(o["segmentation"], "lore")
    return o


def rule_text(premises: list[dict], cls: int, labels=None) -> str:
    """'s3 kept AND s7 absent -> 4 (name)'; the empty rule reads 'always'."""
    body = " AND ".join(f"s{p['superpixel']} {'kept' if p['kept'] else 'absent'}" for p in premises)
    return f"{body or 'always'} -> {class_label(cls, labels)}"


class LORE(Method):
    name = "lore"
    needs = frozenset({"forward"})
    signed = False
    defaults: ClassVar[dict[str, Any]] = {
        "population": 1000, "generations": 10, "crossover": 0.5, "mutation": 0.2,
        "gene_mutation": 0.2, "tournament": 3, "max_depth": None, "min_samples_leaf": 1,
        "counterfactuals": 5, "segmentation": "quickshift", "n_segments": 50,
        "fill": "superpixel_mean", "seed": 0, "cache": True}
    description = "local decision rule and counterfactual rules on superpixels (Guidotti et al. 2018)"

    def run(self, engine, x, targets, logits, opts, shared):
        o = _checked(opts)
        n, c, h, w = x.shape
        maps = np.zeros((n, h, w), np.float32)
        segs = np.zeros((n, h, w), np.int64)
        fills = np.zeros_like(x)
        results = []
        for i in range(n):
            seg = superpixels(x[i], o["segmentation"], o["n_segments"], None, o["seed"])
            fills[i] = superpixel_fill(x[i], seg, o["fill"], "lore")
            features = SuperpixelImage(engine, x[i], seg, fills[i])
            res = explain_one(features, int(targets[i]), np.random.default_rng(o["seed"]), o)
            kept = [p["superpixel"] for p in res["factual"]["premises"] if p["kept"]]
            maps[i] = np.isin(seg, kept)
            segs[i] = seg
            results.append(res)
        info = {"segments": segs, "fill": fills, "explanations": results,
                "fidelity": np.array([r["fidelity"] for r in results]),
                "evaluations": np.array([r["evaluations"] for r in results]),
                "engine_calls": np.array([r["engine_calls"] for r in results]), "seed": o["seed"]}
        return Maps(self.name, maps, targets, False, None, logits, info)

    def explanation(self, maps, i, labels=None):
        r = maps.info["explanations"][i]
        fact = r["factual"]
        cfs = [{"rule": rule_text([{"superpixel": f, "kept": False} for f in cf["changes"]], cf["class"], labels),
                "premises": cf["premises"],
                "class": cf["class"], "changes": [{"superpixel": f, "kept": False} for f in cf["changes"]],
                "n_changes": cf["n_changes"], "minimal": cf["minimal"], "predicted": cf["predicted"],
                "valid": cf["valid"]} for cf in r["counterfactuals"]]
        return {"target": int(maps.targets[i]),
                "rule": {"text": rule_text(fact["premises"], fact["class"], labels), "premises": fact["premises"],
                         "class": fact["class"], "coverage": fact["coverage"], "precision": fact["precision"]},
                "counterfactuals": cfs, "valid_counterfactuals": sum(cf["valid"] for cf in cfs),
                "fidelity": r["fidelity"], "cv_fidelity": r["cv_fidelity"], "hit": r["hit"],
                "neighbourhood": r["neighbourhood"], "same_outcome": r["same_outcome"],
                "tree": {"depth": r["tree_depth"], "leaves": r["tree_leaves"]},
                "superpixels": int(maps.info["segments"][i].max()) + 1,
                "evaluations": r["evaluations"], "engine_calls": r["engine_calls"], "seed": maps.info["seed"]}

    def explanation_arrays(self, maps, i):
        r = maps.info["explanations"][i]
        k = int(maps.info["segments"][i].max()) + 1
        cf = np.array([c["features"] for c in r["counterfactuals"]], bool).reshape(-1, k)
        return {"segments": maps.info["segments"][i].astype(np.int32), "counterfactuals": cf,
                "neighbourhood": r["z"], "neighbourhood_classes": r["y"]}

    def explanation_pictures(self, maps, i, image, labels=None):
        from ..overlays import Picture

        seg, fill = maps.info["segments"][i], maps.info["fill"][i]
        r = maps.info["explanations"][i]
        fact = r["factual"]
        pics = [Picture(f"lore rule\n{rule_text(fact['premises'], fact['class'], labels)}", image,
                        maps.maps[i] > 0)]
        for j, cf in enumerate(r["counterfactuals"]):
            z = cf["features"]
            img = np.where(z[seg][None], image, fill)
            mark = "valid" if cf["valid"] else "INVALID"
            pics.append(Picture(f"counterfactual {j + 1}: remove {', '.join(f's{f}' for f in cf['changes'])}\n"
                                f"model -> {class_label(cf['predicted'], labels)} ({mark})", img, ~z[seg]))
        return pics
