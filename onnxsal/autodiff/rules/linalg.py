"""Linear algebra: MatMul (batched, broadcast) and Gemm (transA, transB, alpha, beta, C).

The cotangent carries the seed axis K in front, so every product is a batched MatMul; each
operand's gradient is summed back over the batch axes it was broadcast along.

Ops: Einsum, Gemm, MatMul.
"""

from __future__ import annotations

from ...errors import ModelError
from .registry import rule


def _transposed(ctx, t: str) -> str:
    """t with its last two axes swapped (a Transpose node: onnxruntime folds it for a
    constant at load time, and the file does not carry a second copy of the weights)."""
    c = ctx.const(t)
    r = c.ndim if c is not None else ctx.rank(t)
    perm = list(range(r - 2)) + [r - 1, r - 2]
    return ctx.b.op("Transpose", [t], perm=perm)


def _swap_last(ctx, t: str, rank: int) -> str:
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.b.op("Transpose", [t], perm=perm)


@rule("MatMul")
def matmul(ctx, node, dys):
    b = ctx.b
    a, w = node.input
    y = node.output[0]
    if ctx.rank(a) < 2 or ctx.rank(w) < 2:
        raise ModelError(f"MatMul node '{node.name}' with a 1-D operand is not supported")
    da = dw = None
    if ctx.needs_grad(a):
        da = ctx.unbroadcast(b.op("MatMul", [dys[0], _transposed(ctx, w)]), a, y, skip_last=2)
    if ctx.needs_grad(w):
        dw = ctx.unbroadcast(b.op("MatMul", [_transposed(ctx, a), dys[0]]), w, y, skip_last=2)
    return [da, dw]


@rule("Gemm")
def gemm(ctx, node, dys):
    b = ctx.b
    a, w = node.input[0], node.input[1]
    c = ctx.input(node, 2)
    y = node.output[0]
    alpha = ctx.attr(node, "alpha", 1.0)
    beta = ctx.attr(node, "beta", 1.0)
    trans_a = ctx.attr(node, "transA", 0)
    trans_b = ctx.attr(node, "transB", 0)
    dy = dys[0]
    if alpha != 1.0:
        dy = b.op("Mul", [dy, ctx.scalar(alpha, y)])
    out: list[str | None] = [None, None, None]
    if ctx.needs_grad(a):
        # dA' = dY @ B'^T, with B'^T = B if transB else B^T
        wt = w if trans_b else _transposed(ctx, w)
        da = b.op("MatMul", [dy, wt])
        out[0] = _swap_last(ctx, da, 3) if trans_a else da
    if ctx.needs_grad(w):
        at = a if trans_a else _transposed(ctx, a)
        dw = b.op("MatMul", [at, dy])
        out[1] = _swap_last(ctx, dw, 3) if trans_b else dw
    if c is not None and ctx.needs_grad(c):
        dc = dys[0] if beta == 1.0 else b.op("Mul", [dys[0], ctx.scalar(beta, y)])
        out[2] = ctx.unbroadcast(dc, c, y)
    return out


@rule("Einsum", min_opset=12)
def einsum(ctx, node, dys):
    """d/d operand i = einsum(dy, the other operands -> operand i's subscripts), with the seed
    axis K as one more letter in front of the output and of operand i's gradient."""
    b = ctx.b
    eq = ctx.attr(node, "equation")
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    if "->" not in eq:
        raise ModelError(f"Einsum node '{node.name}' has an implicit output ('{eq}'); not supported")
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    pool = [c for c in "KZYXWVUTSRQPONMLkzyxwvutsrqponml" if c not in eq]
    k = pool.pop(0)
    if "..." in eq:  # spell the ellipsis out with letters (ranks are known statically)
        n_ell = max(ctx.rank(n) - len(t.replace("...", "")) for n, t in zip(node.input, terms) if "..." in t)
        ell = "".join(pool[:n_ell])
        terms = [t.replace("...", ell[n_ell - (ctx.rank(n) - len(t.replace("...", ""))):]) if "..." in t else t
                 for n, t in zip(node.input, terms)]
        out = out.replace("...", ell)
    letters = lambda t: [c for c in t.replace("...", "")]  # noqa: E731
    grads: list[str | None] = []
    for i, (name, term) in enumerate(zip(node.input, terms)):
        if not ctx.needs_grad(name):
            grads.append(None)
            continue
        ls = letters(term)
        if len(set(ls)) != len(ls):
            raise ModelError(f"Einsum node '{node.name}': a repeated index in '{term}' is not supported")
        others = [t for j, t in enumerate(terms) if j != i]
        avail = set(letters(out)) | {c for t in others for c in letters(t)}
        if not set(ls) <= avail:
            raise ModelError(f"Einsum node '{node.name}': index summed within one operand ('{term}') "
                             f"is not supported")
        sub = ",".join([k + out] + others) + "->" + k + term
        ins = [dys[0]] + [n for j, n in enumerate(node.input) if j != i]
        grads.append(b.op("Einsum", ins, equation=sub))
    return grads
