"""Gradient methods: the five signed and multi-class maps (docs/definitions.md#signed-maps) and the
established gradient methods (docs/definitions.md#method-defaults).

Gradients are g_q = dS_q/dx with respect to the raw [0, 1] input (the engine prepends the
model's preprocessing). Channel reductions:

* original, positive, negative, active, inactive: max over channels of the per-channel
  value in docs/definitions.md#signed-maps (``raw`` holds that per-channel value; for active/inactive the
  signed masked gradient A or I);
* vanilla, gradient x input, integrated gradients, SmoothGrad, guided backprop, epsilon-LRP:
  signed, summed over channels (so that sums of attributions stay sums, e.g. completeness);
  ``raw`` holds the per-channel attribution.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Iterator

import numpy as np

from ..errors import OptionError
from . import registry
from .base import Maps, Method, target_scores

SIGNED_FAMILY = ("original", "positive", "negative", "active", "inactive")
_IG_RULES = {
    "left": "left", "riemann_left": "left", "right": "right", "riemann_right": "right",
    "middle": "middle", "riemann_middle": "middle", "trapezoid": "trapezoid",
    "riemann_trapezoid": "trapezoid", "gausslegendre": "gausslegendre",
    "gauss_legendre": "gausslegendre", "gauss-legendre": "gausslegendre",
}
_ROW_BYTES_BUDGET = 96 * 2**20  # input bytes handed to the engine per call by path methods


# ---------------------------------------------------------------------------------------
# shared helpers


def target_gradient(engine, x: np.ndarray, targets: np.ndarray, shared: dict,
                    rules: str = "default", epsilon: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, g_c) for each image's target, cached in ``shared`` per rule set."""
    key = ("grad", rules, epsilon)
    if key not in shared:
        kw: dict[str, Any] = {"targets": targets, "rules": rules}
        if epsilon is not None:
            kw["epsilon"] = epsilon
        logits, grad = engine.gradient(x, **kw)
        shared[key] = (np.asarray(logits, np.float32), np.asarray(grad, np.float32))
        shared.setdefault("logits", shared[key][0])
    return shared[key]


def multi_class_extremes(engine, x: np.ndarray, targets: np.ndarray, chunk: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """g_c, max_{q != c} g_q and min_{q != c} g_q, per image and element.

    Walks the per-class Jacobian chunk by chunk (``engine.class_gradients``) and keeps a
    running max and min over the other classes, so memory does not grow with the number
    of classes. g_c comes from the same pass, so exact ties compare as ties.
    """
    n = len(x)
    shape = (n,) + tuple(x.shape[1:])
    run_max = np.full(shape, -np.inf, dtype=np.float32)
    run_min = np.full(shape, np.inf, dtype=np.float32)
    g_c = np.zeros(shape, dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    for idx, grads in engine.class_gradients(x, chunk=chunk):
        idx = np.asarray(idx).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        is_target = idx[:, None] == targets[None, :]  # [k, N]
        for j, i in zip(*np.nonzero(is_target)):
            g_c[i] = grads[j, i]
            seen[i] = True
        sel = is_target.reshape(is_target.shape + (1,) * (grads.ndim - 2))
        np.maximum(run_max, np.where(sel, -np.inf, grads).max(axis=0), out=run_max)
        np.minimum(run_min, np.where(sel, np.inf, grads).min(axis=0), out=run_min)
    if not seen.all():
        raise RuntimeError("engine.class_gradients did not yield the target classes "
                           f"{targets[~seen].tolist()}")
    return g_c, run_max, run_min


def signed_maps(engine, x: np.ndarray, targets: np.ndarray, which: Iterable[str],
                chunk: int | None = None, shared: dict | None = None) -> dict[str, Maps]:
    """The maps of docs/definitions.md#signed-maps named in ``which`` (a subset of SIGNED_FAMILY).

    original/positive/negative need g_c only; active/inactive need every class's gradient
    (their declared ``class_gradients``): one walk over the Jacobian serves both, and then
    also provides g_c.
    """
    shared = {} if shared is None else shared
    which = list(which)
    bad = [w for w in which if w not in SIGNED_FAMILY]
    if bad:
        raise OptionError(f"not a signed/multi-class map: {bad}")
    if any("class_gradients" in registry.get(w).needs for w in which):
        key = ("multi", chunk)
        if key not in shared:
            shared[key] = multi_class_extremes(engine, x, targets, chunk)
        g_c, gmax, gmin = shared[key]
    else:
        g_c = target_gradient(engine, x, targets, shared)[1]
        gmax = gmin = None
    logits = shared.get("logits")
    out = {}
    for w in which:
        if w == "original":
            raw = np.abs(g_c)
        elif w == "positive":
            raw = np.maximum(g_c, 0)
        elif w == "negative":
            raw = np.maximum(-g_c, 0)
        elif w == "active":
            raw = np.where(g_c > gmax, g_c, np.float32(0))
        else:  # inactive
            raw = np.where(g_c < gmin, g_c, np.float32(0))
        m = np.abs(raw).max(axis=1)
        out[w] = Maps(w, m.astype(np.float32), targets, False, raw.astype(np.float32),
                      logits)
    return out


def _ig_nodes(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Path positions alpha_k in [0, 1] and their weights (summing to 1)."""
    if steps < 1 or (rule == "trapezoid" and steps < 2):
        raise OptionError(f"integrated gradients needs steps >= {2 if rule == 'trapezoid' else 1}"
                          f", got {steps}")
    k = np.arange(steps, dtype=np.float64)
    if rule == "left":
        return k / steps, np.full(steps, 1.0 / steps)
    if rule == "right":
        return (k + 1) / steps, np.full(steps, 1.0 / steps)
    if rule == "middle":
        return (k + 0.5) / steps, np.full(steps, 1.0 / steps)
    if rule == "trapezoid":
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] *= 0.5
        return np.linspace(0.0, 1.0, steps), w
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def _baseline(x: np.ndarray, baseline) -> np.ndarray:
    """A baseline batch like ``x``: 'black' (0), 'white' (1), a number, or an array."""
    if isinstance(baseline, str):
        if baseline == "black":
            return np.zeros_like(x)
        if baseline == "white":
            return np.ones_like(x)
        raise OptionError(f"baseline must be 'black', 'white', a number or an array, "
                          f"got {baseline!r}")
    b = np.asarray(baseline, dtype=np.float32)
    try:
        return np.broadcast_to(b, x.shape).astype(np.float32)
    except ValueError:
        raise OptionError(f"baseline of shape {b.shape} does not fit images of shape "
                          f"{x.shape}") from None


def _images_per_call(x: np.ndarray, rows_per_image: int) -> int:
    row = int(np.prod(x.shape[1:])) * 4
    return max(1, _ROW_BYTES_BUDGET // max(1, row * rows_per_image))


def _reduce_sum(raw: np.ndarray) -> np.ndarray:
    return raw.sum(axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------
# the five maps of the Signed Saliency Maps paper


class _Signed(Method):
    needs = frozenset({"gradients"})
    signed = False
    defaults = {"chunk": None}
    group = "signed_maps"

    @classmethod
    def run_group(cls, engine, x, targets, names, opts, shared):
        return signed_maps(engine, x, targets, names, opts["chunk"], shared)

    def run(self, engine, x, targets, logits, opts, shared):
        return self.run_group(engine, x, targets, [self.name], opts, shared)[self.name]


class Original(_Signed):
    name = "original"
    description = "max over channels of |g_c| (Simonyan et al.)"


class Positive(_Signed):
    name = "positive"
    description = "max over channels of max(g_c, 0)"


class Negative(_Signed):
    name = "negative"
    description = "max over channels of max(-g_c, 0)"


class Active(_Signed):
    name = "active"
    needs = frozenset({"gradients", "class_gradients"})
    description = "|g_c| where g_c > g_q for every other class q (strict), max over channels"


class Inactive(_Signed):
    name = "inactive"
    needs = frozenset({"gradients", "class_gradients"})
    description = "|g_c| where g_c < g_q for every other class q (strict), max over channels"


# ---------------------------------------------------------------------------------------
# established gradient methods


class Vanilla(Method):
    name = "vanilla"
    aliases = ("gradient", "saliency")
    needs = frozenset({"gradients"})
    signed = True
    defaults: ClassVar[dict[str, Any]] = {}
    description = "g_c, summed over channels"

    def run(self, engine, x, targets, logits, opts, shared):
        lg, g = target_gradient(engine, x, targets, shared)
        return Maps(self.name, _reduce_sum(g), targets, True, g, lg)


class GradientXInput(Method):
    name = "gradient_x_input"
    aliases = ("gradxinput", "grad_x_input", "input_x_gradient", "gxi")
    needs = frozenset({"gradients"})
    signed = True
    defaults: ClassVar[dict[str, Any]] = {}
    description = "x * g_c, summed over channels"

    def run(self, engine, x, targets, logits, opts, shared):
        lg, g = target_gradient(engine, x, targets, shared)
        raw = x * g
        return Maps(self.name, _reduce_sum(raw), targets, True, raw, lg)


class IntegratedGradients(Method):
    name = "integrated_gradients"
    aliases = ("ig", "integrated_gradient")
    needs = frozenset({"gradients", "forward"})
    signed = True
    defaults = {"steps": 50, "baseline": "black", "rule": "middle"}
    description = "(x - x') * path integral of g_c from the baseline x' (Sundararajan et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        rule = _IG_RULES.get(str(opts["rule"]).lower())
        if rule is None:
            raise OptionError(f"unknown integration rule {opts['rule']!r} (choose left, right, "
                              "middle, trapezoid or gausslegendre)")
        steps = int(opts["steps"])
        alphas, weights = _ig_nodes(steps, rule)
        base = _baseline(x, opts["baseline"])
        delta = x - base
        raw = np.zeros_like(x)
        per = _images_per_call(x, steps)
        a = alphas.astype(np.float32).reshape(1, steps, 1, 1, 1)
        w = weights.reshape(1, steps, 1, 1, 1)
        for s in range(0, len(x), per):
            d, b0 = delta[s:s + per], base[s:s + per]
            path = (b0[:, None] + a * d[:, None]).reshape((-1,) + x.shape[1:])
            t = np.repeat(targets[s:s + per], steps)
            _, g = engine.gradient(path, targets=t)
            g = np.asarray(g, np.float64).reshape((len(d), steps) + x.shape[1:])
            raw[s:s + per] = (d * (g * w).sum(axis=1)).astype(np.float32)
        ends = np.asarray(engine.logits(np.concatenate([x, base])), np.float64)
        lg = ends[:len(x)].astype(np.float32)
        gap = target_scores(ends[:len(x)], targets) - target_scores(ends[len(x):], targets)
        total = raw.reshape(len(x), -1).sum(axis=1, dtype=np.float64)
        err = total - gap
        rel = np.abs(err) / np.maximum(np.abs(gap), 1e-12)
        info = {"completeness_error": err, "relative_completeness_error": rel,
                "score_gap": gap, "steps": steps, "rule": rule}
        return Maps(self.name, _reduce_sum(raw), targets, True, raw, lg, info)


class SmoothGrad(Method):
    name = "smoothgrad"
    aliases = ("smooth_grad",)
    needs = frozenset({"gradients"})
    signed = True
    defaults = {"samples": 50, "noise_level": 0.15, "seed": 0}
    description = "mean of g_c over noisy copies (Smilkov et al.)"

    @staticmethod
    def noise(x: np.ndarray, samples: int, noise_level: float, seed) -> Iterator[np.ndarray]:
        """The noise added to each image, one [samples, C, H, W] array per image in order:
        rng = numpy.random.default_rng(seed); for each image,
        rng.standard_normal((samples, C, H, W), float32) * noise_level * (max(x) - min(x)).
        """
        rng = np.random.default_rng(seed)
        for i in range(len(x)):
            std = np.float32(noise_level * (float(x[i].max()) - float(x[i].min())))
            yield rng.standard_normal((samples,) + x.shape[1:], dtype=np.float32) * std

    def run(self, engine, x, targets, logits, opts, shared):
        samples = int(opts["samples"])
        if samples < 1:
            raise OptionError(f"smoothgrad needs samples >= 1, got {samples}")
        noise = self.noise(x, samples, float(opts["noise_level"]), opts["seed"])
        raw = np.zeros_like(x)
        per = _images_per_call(x, samples)
        for s in range(0, len(x), per):
            group = range(s, min(s + per, len(x)))
            noisy = np.concatenate([x[i][None] + next(noise) for i in group])
            t = np.repeat(targets[s:s + per], samples)
            _, g = engine.gradient(noisy, targets=t)
            g = np.asarray(g, np.float32).reshape((-1, samples) + x.shape[1:])
            raw[s:s + per] = g.mean(axis=1)
        info = {"samples": samples, "noise_level": float(opts["noise_level"]),
                "seed": opts["seed"]}
        return Maps(self.name, _reduce_sum(raw), targets, True, raw, logits, info)


class GuidedBackprop(Method):
    name = "guided_backprop"
    aliases = ("guided", "guidedbackprop", "guided_backpropagation")
    needs = frozenset({"gradients"})
    signed = True
    rules = "guided"
    defaults: ClassVar[dict[str, Any]] = {}
    description = "gradient with ReLU backward 1[x > 0] * max(dy, 0) (Springenberg et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        lg, g = target_gradient(engine, x, targets, shared, rules=self.rules)
        return Maps(self.name, _reduce_sum(g), targets, True, g, lg)


class EpsilonLRP(Method):
    name = "lrp"
    aliases = ("epsilon_lrp", "elrp", "lrp_epsilon")
    needs = frozenset({"gradients"})
    signed = True
    rules = "lrp"
    defaults = {"epsilon": 1e-6}
    description = "epsilon-LRP as x times a modified gradient (Bach et al.; Ancona et al.)"

    def run(self, engine, x, targets, logits, opts, shared):
        eps = float(opts["epsilon"])
        if not eps > 0:
            raise OptionError(f"lrp epsilon must be > 0, got {eps}")
        lg, g = target_gradient(engine, x, targets, shared, rules=self.rules, epsilon=eps)
        raw = x * g
        info = {"epsilon": eps, "relevance_sum": raw.reshape(len(x), -1).sum(axis=1),
                "score": target_scores(lg, targets)}
        return Maps(self.name, _reduce_sum(raw), targets, True, raw, lg, info)
