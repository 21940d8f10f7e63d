"""Element-wise operators: activations, arithmetic with broadcasting, selection.

Saved forward tensors ([N, ...]) broadcast against cotangents ([K, N, ...]) with no extra work;
each operand's gradient of a broadcasting op is summed back to its own shape.

Ops: Abs, Acos, Acosh, Add, Asin, Asinh, Atan, Atanh, Cast, CastLike, Ceil, Celu, Clip, Cos,
Cosh, Div, Dropout, Elu, Erf, Exp, Floor, Gelu, HardSigmoid, HardSwish, Hardmax, Identity,
LeakyRelu, Log, Max, Mean, Min, Mish, Mul, Neg, PRelu, Pow, Reciprocal, Relu, Round, Selu,
Shrink, Sigmoid, Sign, Sin, Sinh, Softplus, Softsign, Sqrt, Sub, Sum, Tan, Tanh,
ThresholdedRelu, Where.
"""

from __future__ import annotations

import math

from .registry import rule

# op type -> slope(ctx, node): the name of dy/dx (the diagonal of an element-wise unary op's
# Jacobian) computed from forward tensors only, or None when it is 1. The rule of such an op is
# one K-level Mul; the element-wise region fusion (fusion.py) chains the slopes themselves.
SLOPES: dict = {}


def unary(*op_types: str, min_opset: int = 0):
    """Register ``slope_fn`` as the slope of these element-wise ops and derive their rule."""

    def deco(slope_fn):
        def rule_fn(ctx, node, dys):
            slope = slope_fn(ctx, node)
            dx = dys[0] if slope is None else _mul(ctx, dys[0], slope)
            return [dx] + [None] * (len(node.input) - 1)

        rule_fn.__name__ = slope_fn.__name__
        for op in op_types:
            SLOPES[op] = slope_fn
        rule(*op_types, min_opset=min_opset)(rule_fn)
        return slope_fn

    return deco


def _x(node):
    return node.input[0]


def _y(node):
    return node.output[0]


def _mul(ctx, a, b):
    return ctx.b.op("Mul", [a, b])


@rule("Identity", "Dropout")
def identity(ctx, node, dys):
    return [dys[0]] + [None] * (len(node.input) - 1)


@rule("Cast", "CastLike")
def cast(ctx, node, dys):
    # float -> float only: cast the cotangent back to the input's type
    out = ctx.b.op("Cast", [dys[0]], to=ctx.dtype(_x(node)))
    return [out] + [None] * (len(node.input) - 1)


@unary("Neg")
def neg(ctx, node):
    return ctx.scalar(-1.0, _x(node))


@unary("Relu")
def relu(ctx, node):
    # the mask from the output (y > 0 exactly when x > 0): the input then has no other
    # consumer, so onnxruntime can fuse the forward Conv + Relu
    b = ctx.b
    mask = b.op("Cast", [b.op("Greater", [_y(node), ctx.scalar(0, _x(node))])], to=ctx.dtype(_x(node)))
    return mask


@unary("LeakyRelu")
def leaky_relu(ctx, node):
    b = ctx.b
    alpha = ctx.attr(node, "alpha", 0.01)
    x = _x(node)
    slope = b.op("Where", [b.op("Greater", [x, ctx.scalar(0, x)]), ctx.scalar(1.0, x), ctx.scalar(alpha, x)])
    return slope


@rule("PRelu")
def prelu(ctx, node, dys):
    b = ctx.b
    x, slope = node.input[0], node.input[1]
    pos = b.op("Greater", [x, ctx.scalar(0, x)])
    dx = b.op("Where", [pos, dys[0], _mul(ctx, dys[0], slope)])
    dslope = None
    if ctx.needs_grad(slope):
        contrib = b.op("Where", [pos, ctx.scalar(0, x), _mul(ctx, dys[0], x)])
        dslope = ctx.unbroadcast(contrib, slope, _y(node))
    return [dx, dslope]


@unary("Elu")
def elu(ctx, node):
    b = ctx.b
    alpha = ctx.attr(node, "alpha", 1.0)
    x, y = _x(node), _y(node)
    neg = b.op("Add", [y, ctx.scalar(alpha, x)])  # alpha*exp(x) for x <= 0
    slope = b.op("Where", [b.op("Greater", [x, ctx.scalar(0, x)]), ctx.scalar(1.0, x), neg])
    return slope


@unary("Selu")
def selu(ctx, node):
    b = ctx.b
    alpha = ctx.attr(node, "alpha", 1.67326319217681884765625)
    gamma = ctx.attr(node, "gamma", 1.05070102214813232421875)
    x, y = _x(node), _y(node)
    neg = b.op("Add", [y, ctx.scalar(alpha * gamma, x)])  # gamma*alpha*exp(x)
    slope = b.op("Where", [b.op("Greater", [x, ctx.scalar(0, x)]), ctx.scalar(gamma, x), neg])
    return slope


@unary("Celu")
def celu(ctx, node):
    b = ctx.b
    alpha = ctx.attr(node, "alpha", 1.0)
    x = _x(node)
    neg = b.op("Exp", [b.op("Div", [x, ctx.scalar(alpha, x)])])
    slope = b.op("Where", [b.op("Greater", [x, ctx.scalar(0, x)]), ctx.scalar(1.0, x), neg])
    return slope


@unary("Sigmoid")
def sigmoid(ctx, node):
    b = ctx.b
    y = _y(node)
    slope = _mul(ctx, y, b.op("Sub", [ctx.scalar(1.0, y), y]))
    return slope


@unary("HardSigmoid")
def hard_sigmoid(ctx, node):
    b = ctx.b
    alpha = ctx.attr(node, "alpha", 0.2)
    beta = ctx.attr(node, "beta", 0.5)
    x = _x(node)
    z = b.op("Add", [_mul(ctx, x, ctx.scalar(alpha, x)), ctx.scalar(beta, x)])
    inside = b.op("And", [b.op("Greater", [z, ctx.scalar(0, x)]), b.op("Less", [z, ctx.scalar(1, x)])])
    slope = b.op("Where", [inside, ctx.scalar(alpha, x), ctx.scalar(0, x)])
    return slope


@unary("HardSwish")
def hard_swish(ctx, node):
    # y = x * clip(x/6 + 1/2, 0, 1); dy/dx = 0 (x<-3), x/3 + 1/2 (-3<x<3), 1 (x>3)
    b = ctx.b
    x = _x(node)
    mid = b.op("Add", [b.op("Div", [x, ctx.scalar(3.0, x)]), ctx.scalar(0.5, x)])
    slope = b.op("Where", [b.op("Less", [x, ctx.scalar(-3.0, x)]), ctx.scalar(0.0, x),
                           b.op("Where", [b.op("Greater", [x, ctx.scalar(3.0, x)]), ctx.scalar(1.0, x), mid])])
    return slope


@unary("Tanh")
def tanh(ctx, node):
    b = ctx.b
    y = _y(node)
    slope = b.op("Sub", [ctx.scalar(1.0, y), _mul(ctx, y, y)])
    return slope


@unary("Softplus")
def softplus(ctx, node):
    return ctx.b.op("Sigmoid", [_x(node)])


@rule("Softsign")
def softsign(ctx, node, dys):
    b = ctx.b
    x = _x(node)
    d = b.op("Add", [ctx.scalar(1.0, x), b.op("Abs", [x])])
    return [b.op("Div", [dys[0], _mul(ctx, d, d)])]


@unary("Mish")
def mish(ctx, node):
    # y = x tanh(sp(x)); dy/dx = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)
    b = ctx.b
    x = _x(node)
    t = b.op("Tanh", [b.op("Softplus", [x])])
    sech2 = b.op("Sub", [ctx.scalar(1.0, x), _mul(ctx, t, t)])
    slope = b.op("Add", [t, _mul(ctx, _mul(ctx, x, b.op("Sigmoid", [x])), sech2)])
    return slope


@unary("Erf")
def erf(ctx, node):
    b = ctx.b
    x = _x(node)
    slope = _mul(ctx, b.op("Exp", [b.op("Neg", [_mul(ctx, x, x)])]), ctx.scalar(2.0 / math.sqrt(math.pi), x))
    return slope


@unary("Gelu", min_opset=20)
def gelu(ctx, node):
    b = ctx.b
    x = _x(node)
    if ctx.attr(node, "approximate", "none") in ("tanh", b"tanh"):
        # y = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        x2 = _mul(ctx, x, x)
        u = _mul(ctx, ctx.scalar(c, x), b.op("Add", [x, _mul(ctx, ctx.scalar(0.044715, x), _mul(ctx, x2, x))]))
        t = b.op("Tanh", [u])
        du = _mul(ctx, ctx.scalar(c, x), b.op("Add", [ctx.scalar(1.0, x), _mul(ctx, ctx.scalar(3 * 0.044715, x), x2)]))
        sech2 = b.op("Sub", [ctx.scalar(1.0, x), _mul(ctx, t, t)])
        slope = b.op("Add", [_mul(ctx, ctx.scalar(0.5, x), b.op("Add", [ctx.scalar(1.0, x), t])),
                             _mul(ctx, _mul(ctx, ctx.scalar(0.5, x), x), _mul(ctx, sech2, du))])
    else:
        # y = x Phi(x); dy/dx = Phi(x) + x phi(x)
        phi_cdf = _mul(ctx, ctx.scalar(0.5, x), b.op("Add", [ctx.scalar(1.0, x),
                                                       b.op("Erf", [_mul(ctx, x, ctx.scalar(1 / math.sqrt(2), x))])]))
        pdf = _mul(ctx, ctx.scalar(1 / math.sqrt(2 * math.pi), x),
                   b.op("Exp", [_mul(ctx, ctx.scalar(-0.5, x), _mul(ctx, x, x))]))
        slope = b.op("Add", [phi_cdf, _mul(ctx, x, pdf)])
    return slope


@unary("Exp")
def exp(ctx, node):
    return _y(node)


@rule("Log")
def log(ctx, node, dys):
    return [ctx.b.op("Div", [dys[0], _x(node)])]


@rule("Sqrt")
def sqrt(ctx, node, dys):
    y = _y(node)
    return [ctx.b.op("Div", [dys[0], _mul(ctx, y, ctx.scalar(2.0, y))])]


@rule("Reciprocal")
def reciprocal(ctx, node, dys):
    y = _y(node)
    return [ctx.b.op("Neg", [_mul(ctx, dys[0], _mul(ctx, y, y))])]


@unary("Abs")
def abs_(ctx, node):
    return ctx.b.op("Sign", [_x(node)])


@unary("Sin")
def sin(ctx, node):
    return ctx.b.op("Cos", [_x(node)])


@rule("Cos")
def cos(ctx, node, dys):
    return [ctx.b.op("Neg", [_mul(ctx, dys[0], ctx.b.op("Sin", [_x(node)]))])]


@unary("Tan")
def tan(ctx, node):
    y = _y(node)
    return ctx.b.op("Add", [ctx.scalar(1.0, y), _mul(ctx, y, y)])


@unary("Sinh")
def sinh(ctx, node):
    return ctx.b.op("Cosh", [_x(node)])


@unary("Cosh")
def cosh(ctx, node):
    return ctx.b.op("Sinh", [_x(node)])


def _quadratic_slope(ctx, x, const: float, sign_x2: float, root: bool, negate: bool = False):
    """+-1 / (const + sign_x2 x^2), or its square root: the slopes of Asin, Acos, Asinh, Acosh
    (root) and Atan, Atanh."""
    b = ctx.b
    q = b.op("Add", [ctx.scalar(const, x), _mul(ctx, ctx.scalar(sign_x2, x), _mul(ctx, x, x))])
    return b.op("Div", [ctx.scalar(-1.0 if negate else 1.0, x), b.op("Sqrt", [q]) if root else q])


@unary("Asin")
def asin(ctx, node):
    return _quadratic_slope(ctx, _x(node), 1.0, -1.0, root=True)


@unary("Acos")
def acos(ctx, node):
    return _quadratic_slope(ctx, _x(node), 1.0, -1.0, root=True, negate=True)


@unary("Asinh")
def asinh(ctx, node):
    return _quadratic_slope(ctx, _x(node), 1.0, 1.0, root=True)


@unary("Acosh")
def acosh(ctx, node):
    return _quadratic_slope(ctx, _x(node), -1.0, 1.0, root=True)


@unary("Atan")
def atan(ctx, node):
    return _quadratic_slope(ctx, _x(node), 1.0, 1.0, root=False)


@unary("Atanh")
def atanh(ctx, node):
    return _quadratic_slope(ctx, _x(node), 1.0, -1.0, root=False)


@unary("ThresholdedRelu")
def thresholded_relu(ctx, node):
    x = _x(node)
    alpha = ctx.attr(node, "alpha", 1.0)
    return ctx.b.op("Cast", [ctx.b.op("Greater", [x, ctx.scalar(alpha, x)])], to=ctx.dtype(x))


@unary("Shrink")
def shrink(ctx, node):
    # y = x - bias above lambd, x + bias below -lambd, 0 between: slope 1 outside [-lambd, lambd]
    b = ctx.b
    x = _x(node)
    lambd = ctx.attr(node, "lambd", 0.5)
    outside = b.op("Or", [b.op("Greater", [x, ctx.scalar(lambd, x)]), b.op("Less", [x, ctx.scalar(-lambd, x)])])
    return b.op("Cast", [outside], to=ctx.dtype(x))


@unary("Clip")
def clip(ctx, node):
    b = ctx.b
    x = _x(node)
    if ctx.opset >= 11:
        lo, hi = ctx.input(node, 1), ctx.input(node, 2)
    else:
        lo_v, hi_v = ctx.attr(node, "min"), ctx.attr(node, "max")
        lo = ctx.scalar(lo_v, x) if lo_v is not None else None
        hi = ctx.scalar(hi_v, x) if hi_v is not None else None
    inside = None
    if lo is not None:
        inside = b.op("GreaterOrEqual", [x, lo]) if ctx.opset >= 12 else b.op("Not", [b.op("Less", [x, lo])])
    if hi is not None:
        le = b.op("LessOrEqual", [x, hi]) if ctx.opset >= 12 else b.op("Not", [b.op("Greater", [x, hi])])
        inside = le if inside is None else b.op("And", [inside, le])
    if inside is None:
        return None
    return b.op("Cast", [inside], to=ctx.dtype(x))


# -- broadcasting binary and n-ary ops --------------------------------------------------------

@rule("Add")
def add(ctx, node, dys):
    a, c = node.input
    y = _y(node)
    return [ctx.unbroadcast(dys[0], a, y) if ctx.needs_grad(a) else None,
            ctx.unbroadcast(dys[0], c, y) if ctx.needs_grad(c) else None]


@rule("Sub")
def sub(ctx, node, dys):
    a, c = node.input
    y = _y(node)
    return [ctx.unbroadcast(dys[0], a, y) if ctx.needs_grad(a) else None,
            ctx.unbroadcast(ctx.b.op("Neg", [dys[0]]), c, y) if ctx.needs_grad(c) else None]


@rule("Mul")
def mul(ctx, node, dys):
    a, c = node.input
    y = _y(node)
    return [ctx.unbroadcast(_mul(ctx, dys[0], c), a, y) if ctx.needs_grad(a) else None,
            ctx.unbroadcast(_mul(ctx, dys[0], a), c, y) if ctx.needs_grad(c) else None]


@rule("Div")
def div(ctx, node, dys):
    b = ctx.b
    a, c = node.input
    y = _y(node)
    da = dc = None
    if ctx.needs_grad(a):
        da = ctx.unbroadcast(b.op("Div", [dys[0], c]), a, y)
    if ctx.needs_grad(c):
        # d(a/c)/dc = -y/c
        dc = ctx.unbroadcast(b.op("Neg", [_mul(ctx, dys[0], b.op("Div", [y, c]))]), c, y)
    return [da, dc]


@rule("Pow")
def pow_(ctx, node, dys):
    b = ctx.b
    a, e = node.input
    y = _y(node)
    da = de = None
    if ctx.needs_grad(a):
        if ctx.dtype(e) != ctx.dtype(a):
            e_f = b.op("Cast", [e], to=ctx.dtype(a))
        else:
            e_f = e
        exp_c = ctx.const(e)
        if exp_c is not None and exp_c.size == 1 and float(exp_c) == 2.0:
            slope = _mul(ctx, a, ctx.scalar(2.0, a))
        else:
            slope = _mul(ctx, e_f, b.op("Pow", [a, b.op("Sub", [e_f, ctx.scalar(1.0, a)])]))
        da = ctx.unbroadcast(_mul(ctx, dys[0], slope), a, y)
    if ctx.needs_grad(e):
        de = ctx.unbroadcast(_mul(ctx, dys[0], _mul(ctx, y, b.op("Log", [a]))), e, y)
    return [da, de]


@rule("Sum")
def sum_(ctx, node, dys):
    y = _y(node)
    return [ctx.unbroadcast(dys[0], x, y) if ctx.needs_grad(x) else None for x in node.input]


@rule("Mean")
def mean(ctx, node, dys):
    y = _y(node)
    scaled = ctx.b.op("Div", [dys[0], ctx.scalar(float(len(node.input)), y)])
    return [ctx.unbroadcast(scaled, x, y) if ctx.needs_grad(x) else None for x in node.input]


@rule("Max", "Min")
def max_min(ctx, node, dys):
    # the cotangent goes to the inputs equal to the result, split evenly among ties
    b = ctx.b
    y = _y(node)
    masks = [b.op("Cast", [b.op("Equal", [x, y])], to=ctx.dtype(y)) for x in node.input]
    count = b.add_all(masks) if len(masks) > 1 else masks[0]
    out: list[str | None] = []
    for x, m in zip(node.input, masks):
        if not ctx.needs_grad(x):
            out.append(None)
            continue
        share = b.op("Div", [m, count])
        out.append(ctx.unbroadcast(_mul(ctx, dys[0], share), x, y))
    return out


@rule("Where")
def where(ctx, node, dys):
    b = ctx.b
    cond, a, c = node.input
    y = _y(node)
    out = [None, None, None]
    if ctx.needs_grad(a):
        out[1] = ctx.unbroadcast(b.op("Where", [cond, dys[0], ctx.scalar(0.0, y)]), a, y)
    if ctx.needs_grad(c):
        out[2] = ctx.unbroadcast(b.op("Where", [cond, ctx.scalar(0.0, y), dys[0]]), c, y)
    return out


@rule("Sign", "Floor", "Ceil", "Round", "Hardmax")
def zero_derivative(ctx, node, dys):
    # piecewise constant: zero almost everywhere; nothing flows back
    return [None] * len(node.input)


