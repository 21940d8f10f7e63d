"""Files that carry their own gradient graph (``onnxsal augment``, converters.torch_gradients).

Such a file's gradient outputs are claims, not facts: a vendor file can make every map zero or
point anywhere while its metadata looks like onnxsal's. So :class:`onnxsal.engine.Engine`

* by default (``gradients="auto"`` or ``"rebuild"``) cuts the forward part out of the file
  (:func:`forward_part`: what the image input alone computes) and differentiates it with
  onnxsal's own pass, so that the file's gradient graph and its metadata are never used;
* uses the file's gradient only when asked (``"file"``) or, under ``"auto"``, when the pass
  cannot differentiate the forward part (an operator without a rule), and then only after
  checking its roles (:func:`file_roles`) and its values on probe inputs (:func:`verify`):
  against onnxsal's pass when that can run, else against central finite differences of the
  forward part along random directions; a disagreement is refused.

The probe is evidence, not proof: a graph built to tell a probe from a photograph can pass it.
Only the rebuilt gradient is safe against such a file. See docs/gradient-trust.md.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from .autodiff import META_GRAD, META_LOGITS, META_RULES, META_SEED
from .autodiff.control_flow import effective_inputs, live
from .errors import ModelError, OnnxsalError, OptionError

MODES = ("auto", "rebuild", "file")
PASS_RTOL = 1e-3  # the file's gradient vs onnxsal's pass (float32, other summation orders)
# vs central differences in float32, along each gradient and along random directions (rounding
# and ReLU kinks within a step). Correct gradients of torchvision's ResNet-18 (224 px),
# MobileNetV3 and a ViT: <= 1e-3 along, <= 7e-2 across; scaled by 1.05: 4.8e-2 along; zeroed
# or half-zeroed: >= 0.8 across (benchmarks/gradient_trust.py)
FD_RTOL = (2e-2, 0.3)
FD_STEPS = (1e-3, 1e-4)  # largest pixel change; random directions take a tenth of it
FD_DIRECTIONS = 3
PROBE_CLASSES = 3  # one-hot seed rows; two dense random rows cover every class besides

REBUILT = "onnxsal pass (rebuilt from the forward part; the file's own gradient graph is not used)"
OWN_PASS = "onnxsal pass"


def carries_gradient(model: onnx.ModelProto) -> bool:
    """Whether the file declares a gradient graph of its own (an ``onnxsal.seed`` role)."""
    return any(p.key == META_SEED for p in model.metadata_props)


def _reads(node: onnx.NodeProto) -> set[str]:
    return set(effective_inputs(node)) - {""}


def forward_part(model: onnx.ModelProto, image: str, keep: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The file without its gradient graph: the outputs that depend on no input but ``image``
    and the nodes they need, with the file's metadata except the gradient roles.

    Every other input counts as a seed, whatever the metadata says. Outputs the gradient pass
    adds (forward values, and the logits beside a Softmax output of them) are dropped when
    another forward output remains, unless named in ``keep`` (the user's ``--output``)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    seeds = {i.name for i in g.input if i.name != image and i.name not in inits}
    tainted = set(seeds)
    for n in g.node:  # nodes are in topological order (onnx's checker saw to it)
        if _reads(n) & tainted:
            tainted.update(o for o in n.output if o)
    outs = [o for o in g.output if o.name not in tainted]
    values = {p.value for p in model.metadata_props if p.key.startswith("onnxsal.value.")}
    outs = [o for o in outs if o.name not in values or o.name in keep] or outs
    outs = _without_exposed_logits(model, outs, keep)
    if not outs:
        raise ModelError(f"every output of the file depends on inputs other than its image "
                         f"input '{image}' ({', '.join(sorted(seeds))}): no forward part to "
                         f"rebuild the gradient from")
    wanted = {o.name for o in outs}
    nodes = live(list(g.node), wanted)
    graph = helper.make_graph(
        nodes, g.name, [i for i in g.input if i.name not in seeds and i.name in wanted | {image}],
        outs, [t for t in g.initializer if t.name in wanted],
        value_info=[v for v in g.value_info if v.name in wanted],
        sparse_initializer=[t for t in g.sparse_initializer if t.values.name in wanted])
    m = helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions,
                          ir_version=model.ir_version, producer_name=model.producer_name,
                          producer_version=model.producer_version)
    grad_roles = (META_SEED, META_LOGITS, META_RULES, "onnxsal.input")
    m.metadata_props.extend(p for p in model.metadata_props if p.key not in grad_roles
                            and not p.key.startswith((META_GRAD, "onnxsal.value.")))
    try:
        onnx.checker.check_model(m)
    except Exception as exc:
        raise ModelError(f"the forward part of the file is not a valid model on its own: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    return m


def without_own_gradient(model: onnx.ModelProto, output: str | None = None) -> onnx.ModelProto:
    """The model onnxsal differentiates: the file's :func:`forward_part` when it carries a
    gradient graph of its own, else the file (``output``: the user's choice of output)."""
    if not carries_gradient(model):
        return model
    from .model import find_image_input

    return forward_part(model, find_image_input(model).name, keep=(output,) if output else ())


def _without_exposed_logits(model: onnx.ModelProto, outs: list, keep) -> list:
    """``outs`` without the logits output that ``augment`` exposes beside a Softmax output of
    them (the remaining outputs lead onnxsal to the same logits tensor)."""
    from .model import find_logits

    named = next((p.value for p in model.metadata_props if p.key == META_LOGITS), None)
    others = [o for o in outs if o.name != named]
    if named in keep or not others or len(others) == len(outs):
        return outs
    probe = onnx.ModelProto()
    probe.graph.node.extend(model.graph.node)
    probe.graph.output.extend(others)
    try:
        return others if find_logits(probe).tensor == named else outs
    except OnnxsalError:
        return outs


def file_roles(model: onnx.ModelProto, image: str, logits: str) -> dict[str, str]:
    """The roles needed to run the file's gradient of ``logits`` w.r.t. ``image`` (seed, logits,
    gradient, rules), checked against the graph; one ModelError line for the first problem."""
    entries = [(p.key, p.value) for p in model.metadata_props if p.key.startswith("onnxsal.")]
    twice = [k for k, c in collections.Counter(k for k, _ in entries).items() if c > 1]
    if twice:
        raise ModelError(f"the file's metadata names '{twice[0]}' more than once: which of its "
                         f"gradient roles is meant is ambiguous; refused")
    roles = dict(entries)
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    outputs = {o.name for o in g.output}
    seed = roles[META_SEED]
    if seed not in inputs:
        raise ModelError(f"the file's gradient seed '{seed}' (metadata {META_SEED}) is not an "
                         f"input of its graph")
    if len(inputs[seed].type.tensor_type.shape.dim) != 3:
        raise ModelError(f"the file's gradient seed '{seed}' is not declared [K, N, classes]")
    others = sorted(set(inputs) - {seed, image})
    if others:
        raise ModelError(f"the file's graph has inputs besides its image '{image}' and its seed "
                         f"'{seed}': {', '.join(others[:5])}; refused")
    if roles.get(META_LOGITS) is None:
        raise ModelError(f"the file names a gradient seed but no logits (metadata {META_LOGITS})")
    if roles[META_LOGITS] != logits or logits not in outputs:
        raise ModelError(f"the file's gradient is of '{roles[META_LOGITS]}', which is not the "
                         f"logits output '{logits}' onnxsal explains")
    grad = roles.get(META_GRAD + image)
    if grad is None or grad not in outputs:
        raise ModelError(f"the file carries no gradient output of its image input '{image}' "
                         f"(metadata {META_GRAD}{image}"
                         f"{f' names {grad!r}, not an output' if grad is not None else ' is missing'})")
    return {META_SEED: seed, META_LOGITS: logits, META_GRAD + image: grad,
            META_RULES: roles.get(META_RULES, "default"), "onnxsal.input": image}


def probe(model_hash: str, batch: int, shape, num_classes: int, predicted: Callable):
    """(images [N, ...], seeds [K, N, C]) to check a gradient on, drawn from the file's hash (so
    that its author cannot know them in advance): one-hot rows of the predicted class and
    random others, and two dense random rows."""
    rng = np.random.default_rng(int(model_hash[:16], 16))
    x = rng.uniform(0.1, 0.9, (batch,) + tuple(shape)).astype(np.float32)
    first = int(predicted(x)[0])
    rest = [c for c in rng.permutation(num_classes).tolist() if c != first]
    classes = [first] + rest[:PROBE_CLASSES - 1]
    seeds = np.zeros((len(classes) + 2, batch, num_classes), np.float32)
    seeds[np.arange(len(classes)), :, classes] = 1.0
    seeds[len(classes):] = rng.standard_normal((2, batch, num_classes))
    return x, seeds, rng


def _row_error(got: np.ndarray, want: np.ndarray) -> float:
    """max over seed rows of max |got - want| / max(|got|, |want|) (0 when both are 0)."""
    got = got.reshape(len(got), -1).astype(np.float64)
    want = want.reshape(len(want), -1).astype(np.float64)
    scale = np.maximum(np.abs(got).max(axis=1), np.abs(want).max(axis=1))
    err = np.abs(got - want).max(axis=1)
    return float(np.max(np.where(scale > 0, err / np.where(scale > 0, scale, 1), 0.0)))


def _fd(logits: Callable, x, seeds, grads, dirs, h: float, paired: bool):
    """(central differences, gradient . step) of the seed rows along ``dirs`` [D, N, ...]:
    [K, 1] with direction k for row k (``paired``), else [K, D]. The step is the one really
    taken (float32 rounding of x +- h dir)."""
    plus, minus = x[None] + np.float32(h) * dirs, x[None] - np.float32(h) * dirs
    z = logits(np.concatenate([plus, minus]).reshape((-1,) + x.shape[1:])).astype(np.float64)
    z = z.reshape(2, len(dirs), len(x), -1)
    dz = z[0] - z[1]
    step = (plus - minus).reshape(len(dirs), len(x), -1).astype(np.float64)
    g = grads.reshape(len(grads), len(x), -1).astype(np.float64)
    s = seeds.astype(np.float64)
    if paired:
        return np.einsum("knc,knc->k", s, dz)[:, None], np.einsum("knd,knd->k", g, step)[:, None]
    return np.einsum("knc,mnc->km", s, dz), np.einsum("knd,mnd->km", g, step)


def fd_errors(grads: np.ndarray, x: np.ndarray, seeds: np.ndarray, logits: Callable,
              rng: np.random.Generator) -> tuple[float, float]:
    """How far the seed-contracted gradients are from central differences of ``logits``:
    along each row's own gradient (no cancellation: catches a scaled or other class's
    gradient finely) and along random sign directions (catches a gradient zeroed in places,
    coarsely: float32 differences across ReLU kinks are noisy). The best of two steps each."""
    peak = np.abs(grads.reshape(len(grads), -1)).max(axis=1)
    along = grads / np.where(peak > 0, peak, 1).reshape((-1,) + (1,) * (grads.ndim - 1))
    signs = rng.choice(np.float32([-1, 1]), (FD_DIRECTIONS,) + x.shape)
    return (min(_row_error(*_fd(logits, x, seeds, grads, along, h, True)) for h in FD_STEPS),
            min(_row_error(*_fd(logits, x, seeds, grads, signs, h / 10, False)) for h in FD_STEPS))


def verify(grads: np.ndarray, expected_shape: tuple, roles: dict, reference: np.ndarray | None,
           fd: Callable[[], tuple[float, float]]) -> str:
    """Check the file's gradients (of ``roles``, :func:`file_roles`) on the probe against
    ``reference`` (onnxsal's pass) or else ``fd()`` (:func:`fd_errors`); return what they were
    checked against (for ``Engine.gradient_source``), or raise one ModelError line."""
    name = roles[META_GRAD + roles["onnxsal.input"]]
    if reference is None and roles[META_RULES] != "default":
        raise ModelError(f"the file's own gradient has rules '{roles[META_RULES]}', which finite "
                         f"differences cannot check, and onnxsal's pass cannot differentiate the "
                         f"forward part: refused")
    if tuple(grads.shape) != tuple(expected_shape):
        raise ModelError(f"the file's gradient output '{name}' has shape {list(grads.shape)} for "
                         f"{expected_shape[0]} seed rows of {expected_shape[1]} images; expected "
                         f"{list(expected_shape)}: refused")
    if not np.isfinite(grads).all():
        raise ModelError(f"the file's gradient output '{name}' is NaN or Inf on a probe input: refused")
    if reference is not None:
        errs, tols, what = (_row_error(grads, reference),), (PASS_RTOL,), "onnxsal's pass"
    else:
        errs, tols, what = fd(), FD_RTOL, "central finite differences of the forward part"
    shown = " along the gradient, ".join(f"{e:.1e}" for e in errs) + (" across" if len(errs) > 1 else "")
    if not all(e <= t for e, t in zip(errs, tols)):
        hint = " (the default --gradients auto uses onnxsal's pass)" if reference is not None else ""
        limits = "/".join(f"{t:.0e}" for t in tols)
        raise ModelError(f"the file's own gradient disagrees with {what} on a probe input: max "
                         f"rel err {shown} (tolerance {limits}); refused{hint}")
    return f"file's own, verified against {what} (max rel err {shown})"


def plan(carries: bool, differentiable: bool) -> str:
    """What ``onnxsal inspect`` says of whose gradients the default engine will use."""
    if not carries:
        return OWN_PASS
    if differentiable:
        return ("onnxsal pass: the file carries its own gradient graph, which is not used; it is "
                "rebuilt from the forward part listed here (--gradients file: use the file's, "
                "after a check against the pass)")
    return ("the file's own gradient graph, after a check against finite differences of the "
            "forward part listed here (refused on disagreement): onnxsal's pass cannot "
            "differentiate it")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise OptionError(f"gradients '{mode}' is not one of {', '.join(MODES)}")
    return mode


__all__ = ["MODES", "carries_gradient", "forward_part", "without_own_gradient", "file_roles",
           "probe", "fd_errors", "verify", "plan", "check_mode", "REBUILT", "OWN_PASS"]
