"""A saliency method and a rule set defined outside the package, as a plugin would define
them (used by tests/test_methods_registry.py; not collected by pytest itself).

``toy_deconvnet`` rule set: the deconvnet rule of Zeiler & Fergus at every ReLU, the
cotangent's positive part whatever the ReLU's input. ``toy_deconvnet`` and
``toy_deconvnet_abs`` (one group) are the signed and absolute maps of that modified gradient.
"""

from __future__ import annotations

import numpy as np

from onnxsal.autodiff.rules import rule
from onnxsal.methods import Maps, Method
from onnxsal.methods.gradient import target_gradient

#: the ``names`` of every run_group call, so that a test can see what was shared
GROUP_CALLS: list[list[str]] = []


@rule("Relu", ruleset="toy_deconvnet")
def deconvnet_relu(ctx, node, dys):
    return [ctx.b.op("Relu", [dys[0]])]


class _Deconvnet(Method):
    needs = frozenset({"gradients"})
    signed = True
    rules = "toy_deconvnet"
    group = "toy_deconvnet"
    defaults = {"scale": 1.0}

    @classmethod
    def run_group(cls, engine, x, targets, names, opts, shared):
        GROUP_CALLS.append(list(names))
        logits, g = target_gradient(engine, x, targets, shared, rules=cls.rules)
        g = g * np.float32(opts["scale"])
        out = {}
        for name in names:
            raw = g if name == "toy_deconvnet" else np.abs(g)
            m = raw.sum(axis=1) if name == "toy_deconvnet" else raw.max(axis=1)
            out[name] = Maps(name, m, targets, name == "toy_deconvnet", raw, logits)
        return out

    def run(self, engine, x, targets, logits, opts, shared):
        return self.run_group(engine, x, targets, [self.name], opts, shared)[self.name]


class ToyDeconvnet(_Deconvnet):
    name = "toy_deconvnet"
    aliases = ("toy_deconv",)
    description = "deconvnet-modified gradient, summed over channels"


class ToyDeconvnetAbs(_Deconvnet):
    name = "toy_deconvnet_abs"
    signed = False
    description = "|deconvnet-modified gradient|, max over channels"
