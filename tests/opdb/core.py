"""Op database entries for the tensor ops: elementwise, reductions, shapes, indexing,
matrix products, softmax, devices. Format: tests/opdb/__init__.py."""
import numpy as np

from . import LOW, Const, OpInfo, S, bool_, float16, float32, float64, int32, int64

FLOATS = (float64, float32)
FL = FLOATS + LOW   # float16 / bfloat16 too (vs PyTorch's own low-precision CPU ops)
INTS = (int64, int32)


# ---- sample generators ----------------------------------------------------------------
def binary_samples(make, **kw):
    """Same shapes, broadcasting both ways, 0-d, size-1 dims, non-contiguous, scalars."""
    return [
        S(make(3, 4, **kw), make(3, 4, **kw)),
        S(make(3, 1, **kw), make(4, **kw)),                     # (3, 1) with (4,)
        S(make(2, 1, 3, **kw), make(1, 4, 1, **kw)),             # both sides broadcast
        S(make(**kw), make(2, 3, **kw)),                         # 0-d with 2-d
        S(make(1, **kw), make(1, **kw)),                         # size-1
        S(make(3, 4, noncontig=True, **kw), make(4, **kw)),
        S(make(2, 3, **kw), 1.5),                                # Python scalar on the right
        S(0.75, make(2, 3, **kw)),                               # ... and on the left
    ]


def int_binary_samples(make):
    return [S(make(3, 4), make(3, 4)), S(make(3, 1), make(4)), S(make(2, 3), 3),
            S(make(), make(2, 3))]


def unary_samples(make, **kw):
    return [
        S(make(3, 4, **kw)),
        S(make(**kw)),                                           # 0-d
        S(make(1, 5, 1, **kw)),                                  # size-1 dims
        S(make(4, 3, noncontig=True, **kw)),
    ]


def _tied_pair(make):
    """(a, b) of shape (3, 4) where b copies a at random places: exact ties."""
    a = make(3, 4)
    return a, np.where(make.mask(3, 4), a, make(3, 4))


def _binary(name, op, covers, gg=True, **kw):
    return OpInfo(name, op=op, samples=binary_samples, covers=covers, gradgradcheck=gg, **kw)


def _unary(name, covers=None, gg=True, samples=None, call=None, **kw):
    op = call or (lambda m, x, _n=name: getattr(m, _n)(x))
    return OpInfo(name, op=op, samples=samples or unary_samples,
                  covers=(name,) if covers is None else covers, gradgradcheck=gg, **kw)


def _avoid(*points, **extra):
    """A unary sample generator keeping values off ``points`` (kinks of the op)."""
    return lambda make: unary_samples(make, avoid=points, **extra)


# ---- elementwise ----------------------------------------------------------------------
ELEMENTWISE = [
    _binary("add", lambda m, a, b: a + b, ("add",), dtypes=FL),
    _binary("add_alpha", lambda m, a, b: m.add(a, b, alpha=2) if not isinstance(a, float)
            else b.add(a, alpha=2), ("add", "mul_scalar")),
    _binary("sub", lambda m, a, b: a - b, ("sub",), dtypes=FL),
    _binary("mul", lambda m, a, b: a * b, ("mul",), dtypes=FL),
    OpInfo("div", op=lambda m, a, b: a / b, covers=("div",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), make(3, 4, low=0.5, high=2)),
                                 S(make(3, 1), make(4, low=-2, high=-0.5)),
                                 S(make(), make(2, 3, low=0.5, high=2)),
                                 S(make(2, 3, noncontig=True), 2.5),
                                 S(1.5, make(2, 3, low=0.5, high=2))]),
    OpInfo("pow", op=lambda m, a, b: a ** b, covers=("pow",), gradgradcheck=True,
           domain=(0.5, 2.0),
           samples=lambda make: [S(make(3, 4), make(3, 4, low=-1.5, high=2)),
                                 S(make(3, 1), make(4)),
                                 S(make(), make(2, 3)),
                                 # zeros in the base: d/db a**b is 0 there (as torch)
                                 S(np.where(make.mask(3, 4), make(3, 4), 0).astype(make.dtype),
                                   make(3, 4, low=1.5, high=3),
                                   skip=("gradcheck", "gradgradcheck"))]),
    # a floating tensor with a Python number: the *_scalar ops (no 0-d tensor is made)
    OpInfo("add_scalar", op=lambda m, x, s: x + s, covers=("add_scalar",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 2.5), S(make(3, 4), -3), S(make(), 0.5)]),
    OpInfo("radd_scalar", op=lambda m, x, s: s + x, covers=("add_scalar",),
           samples=lambda make: [S(make(3, 4), 2.5), S(make(2, 3), 1)]),
    OpInfo("sub_scalar", op=lambda m, x, s: x - s, covers=("add_scalar",),
           samples=lambda make: [S(make(3, 4), 2.5), S(make(2, 3), 4)]),
    OpInfo("mul_scalar", op=lambda m, x, s: x * s, covers=("mul_scalar",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 2.5), S(make(3, 4), -2), S(make(), 0.0),
                                 S(make(2, 3), True)]),
    OpInfo("rmul_scalar", op=lambda m, x, s: s * x, covers=("mul_scalar",),
           samples=lambda make: [S(make(3, 4), 0.25), S(make(2, 3), 3)]),
    OpInfo("pow_scalar", op=lambda m, x, e: x ** e, covers=("pow_scalar",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 2), S(make(3, 4), 3), S(make(2, 3), 0),
                                 S(make(2, 3, low=0.5, high=2), 0.5),
                                 S(make(2, 3, low=0.5, high=2), -1.5),
                                 S(make(), 2)]),
    OpInfo("rpow_scalar", op=lambda m, x, b: b ** x, covers=("rpow_scalar",),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 2.0), S(make(2, 3), 0.5), S(make(), 3.0)]),
    OpInfo("maximum", op=lambda m, a, b: m.maximum(a, b), covers=("maximum",),
           samples=lambda make: binary_samples(make)[:6]),      # tensors only (as torch)
    OpInfo("minimum", op=lambda m, a, b: m.minimum(a, b), covers=("minimum",),
           samples=lambda make: binary_samples(make)[:6]),
    OpInfo("maximum_ties", op=lambda m, a, b: m.maximum(a, b), covers=("maximum",),
           gradcheck=False,  # at a tie the gradient is split in half (a subgradient)
           samples=lambda make: [S(*_tied_pair(make))]),
    OpInfo("minimum_ties", op=lambda m, a, b: m.minimum(a, b), covers=("minimum",),
           gradcheck=False,
           samples=lambda make: [S(*_tied_pair(make))]),
    OpInfo("where", op=lambda m, c, a, b: m.where(c, a, b), covers=("where",),
           gradgradcheck=True,
           samples=lambda make: [S(make.mask(3, 4), make(3, 4), make(3, 4)),
                                 S(make.mask(3, 1), make(4), make(3, 4)),     # broadcast
                                 S(make.mask(2, 3), make(2, 3, noncontig=True), make())]),
    OpInfo("where_scalar", op=lambda m, c, a: m.where(c, a, 0.0), covers=("where",),
           samples=lambda make: [S(make.mask(3, 4), make(3, 4))]),
    OpInfo("remainder", op=lambda m, a, b: a % b, covers=("remainder",),
           samples=lambda make: [S(make(3, 4, high=5), make(3, 4, low=0.7, high=2)),
                                 S(make(3, 4, low=-5), -1.3),       # sign of the divisor
                                 S(make(2, 3), make(3, low=0.7, high=2))]),
    OpInfo("fmod", op=lambda m, a, b: m.fmod(a, b), covers=("remainder",),
           samples=lambda make: [S(make(3, 4, low=-5, high=5), make(3, 4, low=0.7, high=2)),
                                 S(make(3, 4, low=-5), -1.3)]),     # sign of the dividend
    OpInfo("remainder_int", op=lambda m, a, b: a % b, covers=("remainder",), dtypes=INTS,
           grad=False, samples=lambda make: [S(make(3, 4), make(3, 4, low=1, high=4)),
                                             S(make(3, 4), -3)]),
    # torch's // has no backward; its div(rounding_mode="floor") has the zero gradient
    OpInfo("floor_divide", op=lambda m, a, b: a // b, covers=("floor_divide",),
           ref=lambda m, a, b: m.div(a, b, rounding_mode="floor"),
           samples=lambda make: [S(make(3, 4, low=-5, high=5), make(3, 4, low=0.7, high=2)),
                                 S(make(3, 4, low=-5, high=5), -1.5)]),
    OpInfo("div_rounding", op=lambda m, a, b, mode: m.div(a, b, rounding_mode=mode),
           covers=("floor_divide", "div", "floor", "ceil"),
           samples=lambda make: [S(make(3, 4, low=-5, high=5), make(3, 4, low=0.7, high=2),
                                   "floor"),
                                 S(make(3, 4, low=-5, high=5), -1.5, "trunc")]),
    OpInfo("floor_divide_int", op=lambda m, a, b: a // b, covers=("floor_divide",),
           dtypes=INTS, grad=False,
           samples=lambda make: [S(make(3, 4), make(3, 4, low=1, high=4)), S(make(3, 4), -2)]),
    OpInfo("cumsum", op=lambda m, x, d: x.cumsum(d), covers=("cumsum",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 0), S(make(3, 4), 1), S(make(2, 3, 4), -1),
                                 S(make(5), 0), S(make(), 0)]),
    OpInfo("cumsum_int", op=lambda m, x, d: x.cumsum(d), covers=("cumsum",),
           dtypes=INTS + (bool_,), grad=False,
           samples=lambda make: [S(make(3, 4), 1), S(make(4), 0)]),
    OpInfo("add_int", op=lambda m, a, b: a + b, covers=("add",), dtypes=INTS, grad=False,
           samples=int_binary_samples),
    OpInfo("mul_int", op=lambda m, a, b: a * b, covers=("mul",), dtypes=INTS, grad=False,
           samples=int_binary_samples),
    OpInfo("sub_int", op=lambda m, a, b: a - b, covers=("sub",), dtypes=INTS, grad=False,
           samples=int_binary_samples),
    OpInfo("div_int", op=lambda m, a, b: a / b, covers=("div", "to_dtype"), dtypes=INTS,
           grad=False, samples=lambda make: [S(make(3, 4), make(3, 4, low=1, high=4)),
                                             S(make(3, 4), 2)]),
    OpInfo("add_bool", op=lambda m, a, b: a + b, covers=("add",), dtypes=(bool_,),
           grad=False, samples=lambda make: [S(make(3, 4), make(3, 4))]),
    # mixed dtypes: an int64 tensor with a float tensor, a 0-d float64 with a float32 tensor
    OpInfo("add_mixed", op=lambda m, a, b: a + b, covers=("add", "to_dtype"), grad=False,
           samples=lambda make: [S(make(3, 4), make(3, 4, dtype=int64)),
                                 S(make(3, 4), make(dtype=float64)),
                                 S(make(3, 4, dtype=int64), 2.5)]),
]

for _name, _ufunc in (("eq", "equal"), ("ne", "not_equal"), ("gt", "greater"), ("lt", "less"),
                      ("ge", "greater_equal"), ("le", "less_equal")):
    ELEMENTWISE.append(OpInfo(
        _name, op=lambda m, a, b, _n=_name: getattr(m, _n)(a, b), covers=(_ufunc,),
        grad=False, dtypes=(float64, float32, int64),
        # ties on purpose: b copies a where the mask is set
        samples=lambda make: [S(*_tied_pair(make)), S(make(3, 1), make(4)), S(make(2, 3), 1)]))
ELEMENTWISE.append(OpInfo("operators_cmp", grad=False, covers=(),
                          op=lambda m, a, b: (a == b, a != b, a < b, a <= b, a > b, a >= b),
                          samples=lambda make: [S(make(3, 4), make(4)), S(make(2, 2), 0.5)]))

ELEMENTWISE += [
    OpInfo("logical_not", op=lambda m, a: m.logical_not(a), covers=("logical_not",),
           dtypes=(bool_,), grad=False, samples=lambda make: [S(make(3, 4)), S(make())]),
    OpInfo("logical_and", op=lambda m, a, b: m.logical_and(a, b), covers=("logical_and",),
           dtypes=(bool_,), grad=False, samples=lambda make: [S(make(3, 4), make(4))]),
    OpInfo("logical_or", op=lambda m, a, b: m.logical_or(a, b), covers=("logical_or",),
           dtypes=(bool_,), grad=False, samples=lambda make: [S(make(3, 4), make(4))]),
    OpInfo("bool_operators", op=lambda m, a, b: (~a, a & b, a | b), grad=False,
           covers=("logical_not", "logical_and", "logical_or"), dtypes=(bool_,),
           samples=lambda make: [S(make(3, 4), make(3, 4))]),
    _unary("neg", call=lambda m, x: -x, dtypes=FL),
    _unary("exp", dtypes=FL),
    _unary("log", domain=(0.2, 3.0)),
    _unary("log1p", domain=(-0.8, 2.0)),
    _unary("sqrt", domain=(0.2, 3.0)),
    _unary("rsqrt", domain=(0.2, 3.0)),
    _unary("sin"), _unary("cos"),
    _unary("abs", samples=_avoid(0.0)),
    _unary("abs_operator", covers=("abs",), call=lambda m, x: abs(x), samples=_avoid(0.0)),
    # piecewise constant: zero gradients, as torch (finite differences fail at the jumps)
    _unary("sign", samples=lambda make: [
        S(np.array([-1.5, 0.0, 2.0, -0.0], make.dtype), skip=("gradcheck",)), S(make(3, 4))]),
    _unary("floor"), _unary("ceil"),
    _unary("round", samples=lambda make: [
        S(np.array([0.5, 1.5, 2.5, -0.5, -1.4, 0.2], make.dtype), skip=("gradcheck",)),
        S(make(3, 4))]),
    _unary("trunc", covers=("floor", "ceil", "where", "greater_equal")),
    _unary("square", covers=("mul",)),
    _unary("reciprocal", covers=("div",), domain=(0.5, 2.0)),
    _unary("expm1", covers=("exp", "add_scalar")),
    _unary("log2", covers=("log", "mul"), domain=(0.2, 3.0)),
    _unary("log10", covers=("log", "mul"), domain=(0.2, 3.0)),
    _unary("exp_int", covers=("exp", "to_dtype"), call=lambda m, x: m.exp(x), dtypes=INTS,
           grad=False, samples=lambda make: [S(make(3, 4))]),
    _unary("sigmoid", kernels=("sigmoid", "sigmoid_backward"),
           covers=("sigmoid", "sigmoid_backward"), dtypes=FL,
           samples=lambda make: unary_samples(make) + [
               S(np.array([-800.0, -30.0, 0.0, 30.0, 800.0], make.dtype),
                 skip=("gradcheck", "gradgradcheck"))]),       # no overflow at large |x|
    _unary("tanh", kernels=("tanh", "tanh_backward"), covers=("tanh", "tanh_backward"),
           dtypes=FL),
    _unary("relu", kernels=("relu", "relu_backward"), covers=("relu", "relu_backward"),
           samples=_avoid(0.0), call=lambda m, x: m.relu(x)),
    _unary("erf", covers=("erf",)),
    OpInfo("clamp", op=lambda m, x, **kw: m.clamp(x, **kw), covers=("clamp",),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4, avoid=(-0.5, 0.7)), min=-0.5, max=0.7),
                                 S(make(3, 4, avoid=(-0.5,)), min=-0.5),
                                 S(make(4, 3, noncontig=True, avoid=(0.3,)), max=0.3),
                                 S(make(avoid=(0.0,)), min=0.0)]),
    OpInfo("clamp_tensor", op=lambda m, x, lo, hi: m.clamp(x, min=lo, max=hi),
           covers=("maximum", "minimum"),
           samples=lambda make: [S(make(3, 4, low=-2, high=2),
                                   make(4, low=-1.2, high=-0.3), make(3, 1, low=0.3, high=1.2))]),
    OpInfo("clip", op=lambda m, x: x.clip(-0.5, 0.5), covers=("clamp",),
           samples=lambda make: [S(make(3, 4, avoid=(-0.5, 0.5)))]),
    OpInfo("to_dtype", op=lambda m, x: x.to(m.float64 if x.dtype == m.float32 else m.float32),
           dtypes=FL,
           covers=("to_dtype",), gradcheck=False,  # float64 -> float32 rounds: no finite diff.
           samples=lambda make: [S(make(3, 4)), S(make())]),
    OpInfo("to_half", op=lambda m, x: x.half() * 2, covers=("to_dtype",), gradcheck=False,
           samples=lambda make: [S(make(3, 4)), S(make())]),
    OpInfo("to_bfloat16", op=lambda m, x: x.bfloat16() * 2, covers=("to_dtype",),
           gradcheck=False, samples=lambda make: [S(make(3, 4)), S(make())]),
    OpInfo("to_long", op=lambda m, x: (x * 3).long(), covers=("to_dtype",), grad=False,
           samples=lambda make: [S(make(3, 4))]),
    OpInfo("clone", op=lambda m, x: x.clone(), covers=("clone",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4)), S(make(3, 4, noncontig=True)), S(make())]),
]


# ---- reductions -----------------------------------------------------------------------
def reduce_samples(make, **kw):
    return [
        S(make(3, 4, **kw)),                                     # all elements
        S(make(3, 4, **kw), dim=1),
        S(make(2, 3, 4, **kw), dim=(0, 2)),
        S(make(2, 3, 4, **kw), dim=-1, keepdim=True),
        S(make(2, 3, 4, **kw), dim=(0, -1), keepdim=True),
        S(make(4, 1, 3, noncontig=True, **kw), dim=1),           # size-1 reduced dim
        S(make(**kw)),                                           # 0-d
        S(make(**kw), dim=0, keepdim=True),
    ]


def _reduction(name, covers=None, gg=True, samples=reduce_samples, **kw):
    return OpInfo(name, op=lambda m, x, _n=name, **a: getattr(m, _n)(x, **a),
                  covers=(name,) if covers is None else covers, samples=samples,
                  gradgradcheck=gg, **kw)


def _torch_prod(x, dim=None, keepdim=False):
    """torch.prod takes one dim: reduce a tuple of dims one at a time (last first)."""
    if dim is None or isinstance(dim, int):
        return x.prod() if dim is None else x.prod(dim, keepdim=keepdim)
    for d in sorted((d % x.ndim for d in dim), reverse=True):
        x = x.prod(d, keepdim=keepdim)
    return x


def _with_zeros(make):
    a = make(2, 3, 4, low=0.5, high=2.0) * np.where(make.mask(2, 3, 4), -1, 1)
    a.reshape(-1)[[0, 5, 6, 13]] = 0  # one zero in some groups, two in others
    return a.astype(make.dtype)


def _ties(make, *shape):
    """Values with exact ties (from a small set)."""
    return make.rng.choice(np.array([-1.0, 0.5, 2.0]), shape).astype(make.dtype)


REDUCTIONS = [
    _reduction("sum", dtypes=FL),
    _reduction("mean", dtypes=FL),
    _reduction("prod", samples=lambda make: reduce_samples(make, low=0.5, high=1.5),
               ref=lambda m, x, **kw: _torch_prod(x, **kw)),
    OpInfo("prod_zeros", op=lambda m, x, **kw: m.prod(x, **kw), covers=("prod",),
           samples=lambda make: [S(_with_zeros(make), dim=2), S(_with_zeros(make), dim=0),
                                 S(_with_zeros(make)[0, :1, :2])]),
    OpInfo("sum_int", op=lambda m, x, **kw: m.sum(x, **kw), covers=("sum", "to_dtype"),
           dtypes=(int64, int32, bool_), grad=False,
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=0)]),
    _reduction("amax", samples=lambda make: reduce_samples(make, distinct=True)),
    _reduction("amin", samples=lambda make: reduce_samples(make, distinct=True)),
    OpInfo("amax_ties", op=lambda m, x, **kw: m.amax(x, **kw), covers=("amax",),
           gradcheck=False,  # ties share the gradient evenly (a subgradient)
           samples=lambda make: [S(_ties(make, 3, 4), dim=1), S(_ties(make, 3, 4))]),
    OpInfo("max_all", op=lambda m, x: m.max(x), covers=("amax",),
           samples=lambda make: [S(make(3, 4, distinct=True)), S(make())]),
    OpInfo("min_all", op=lambda m, x: x.min(), covers=("amin",),
           samples=lambda make: [S(make(3, 4, distinct=True))]),
    OpInfo("max_dim", op=lambda m, x, **kw: m.max(x, **kw), covers=("max_dim",),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4, distinct=True), dim=1),
                                 S(make(2, 3, 4, distinct=True), dim=0, keepdim=True),
                                 S(make(4, 3, distinct=True, noncontig=True), dim=-1),
                                 S(make(), dim=0)]),
    OpInfo("min_dim", op=lambda m, x, **kw: x.min(**kw), covers=("max_dim",),
           samples=lambda make: [S(make(3, 4, distinct=True), dim=0),
                                 S(make(2, 3, 4, distinct=True), dim=2, keepdim=True)]),
    OpInfo("max_dim_ties", op=lambda m, x: m.max(x, dim=1), covers=("max_dim",),
           gradcheck=False,  # the index of the first maximum (as torch on the CPU)
           samples=lambda make: [S(_ties(make, 4, 5))]),
    OpInfo("max_binary", op=lambda m, a, b: m.max(a, b), covers=("maximum",),
           samples=lambda make: [S(make(3, 4), make(4))]),
    OpInfo("argmax", op=lambda m, x, **kw: m.argmax(x, **kw), covers=("argmax",), grad=False,
           dtypes=(float64, float32, int64),
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=1),
                                 S(make(2, 3, 4), dim=0, keepdim=True), S(make()),
                                 S(_ties(make, 3, 4) if make.dtype.kind == "f" else
                                   make(3, 4, low=0, high=2), dim=1)]),
    OpInfo("argmin", op=lambda m, x, **kw: x.argmin(**kw), covers=("argmax",), grad=False,
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=-1, keepdim=True),
                                 S(_ties(make, 3, 4), dim=0)]),
    OpInfo("all", op=lambda m, x, **kw: m.all(x, **kw), covers=("all",), grad=False,
           dtypes=(bool_,),
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=1),
                                 S(make(2, 3, 4), dim=0, keepdim=True),
                                 S(np.ones((2, 3), bool))]),
    OpInfo("any", op=lambda m, x, **kw: x.any(**kw), covers=("any",), grad=False,
           dtypes=(bool_,),
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=-1),
                                 S(np.zeros((2, 3), bool), dim=0)]),
    OpInfo("var", op=lambda m, x, **kw: m.var(x, **kw), covers=("mean", "sub", "mul", "sum"),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=1),
                                 S(make(2, 3, 4), dim=(0, 2), keepdim=True, correction=0),
                                 S(make(2, 3, 4), dim=-1, unbiased=False)]),
    OpInfo("std", op=lambda m, x, **kw: x.std(**kw), covers=("sqrt",),
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), dim=0, keepdim=True)]),
    OpInfo("logsumexp", op=lambda m, x, dim, **kw: m.logsumexp(x, dim, **kw),
           covers=("amax", "exp", "log"), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 1), S(make(2, 3, 4), (0, 2), keepdim=True),
                                 S(make(3, 4) * 300, 0, skip=("float16",))]),   # stable
]


# ---- shapes ---------------------------------------------------------------------------
SHAPES = [
    OpInfo("reshape", op=lambda m, x, s: x.reshape(s), covers=("reshape",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), (4, 3)), S(make(3, 4), (-1,)),
                                 S(make(2, 3, 4), (6, -1)), S(make(), (1, 1)),
                                 S(make(1), ()), S(make(4, 3, noncontig=True), (2, 6))]),
    OpInfo("view", op=lambda m, x: x.view(2, -1), covers=("reshape",),
           samples=lambda make: [S(make(4, 3))]),
    OpInfo("view_as", op=lambda m, x, y: x.view_as(y), covers=("reshape",),
           samples=lambda make: [S(make(4, 3), Const(make(2, 6)))]),
    OpInfo("flatten", op=lambda m, x, *a: m.flatten(x, *a), covers=("reshape",),
           samples=lambda make: [S(make(2, 3, 4)), S(make(2, 3, 4, 2), 1, 2),
                                 S(make(2, 3, 4), 1), S(make())]),
    OpInfo("unflatten", op=lambda m, x, d, s: x.unflatten(d, s), covers=("reshape",),
           samples=lambda make: [S(make(2, 6), 1, (2, 3)), S(make(6, 2), 0, (3, 2))]),
    OpInfo("squeeze", op=lambda m, x, *a: m.squeeze(x, *a), covers=("reshape",),
           samples=lambda make: [S(make(1, 3, 1, 2)), S(make(1, 3, 1, 2), 2),
                                 S(make(1, 3, 1, 2), -4), S(make(3, 2), 0),
                                 S(make(1, 3, 1, 2), (0, 2)), S(make(1))]),
    OpInfo("unsqueeze", op=lambda m, x, d: x.unsqueeze(d), covers=("reshape",),
           samples=lambda make: [S(make(3, 2), 0), S(make(3, 2), -1), S(make(3, 2), 1),
                                 S(make(), 0)]),
    OpInfo("permute", op=lambda m, x, *d: x.permute(*d), covers=("permute",),
           gradgradcheck=True,
           samples=lambda make: [S(make(2, 3, 4), 2, 0, 1), S(make(2, 3, 4), -1, 1, 0),
                                 S(make(3, 4, noncontig=True), 1, 0)]),
    OpInfo("permute_tuple", op=lambda m, x, d: m.permute(x, d), covers=("permute",),
           samples=lambda make: [S(make(2, 3, 4), (1, 2, 0))]),
    OpInfo("transpose", op=lambda m, x, a, b: m.transpose(x, a, b), covers=("permute",),
           samples=lambda make: [S(make(2, 3, 4), 0, 2), S(make(2, 3), -1, -2),
                                 S(make(3), 0, 0)]),
    OpInfo("t", op=lambda m, x: x.t(), covers=("permute",),
           samples=lambda make: [S(make(2, 3)), S(make(3))]),
    OpInfo("T_mT", op=lambda m, x: (x.T, x.mT) if x.ndim == 2 else x.mT, covers=("permute",),
           samples=lambda make: [S(make(2, 3)), S(make(4, 2, 3))]),
    OpInfo("movedim", op=lambda m, x, s, d: m.movedim(x, s, d), covers=("permute",),
           samples=lambda make: [S(make(2, 3, 4), 0, -1), S(make(2, 3, 4), 2, 0)]),
    OpInfo("expand", op=lambda m, x, *s: x.expand(*s), covers=("expand",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 1), 3, 4), S(make(3, 1), 2, -1, 4),
                                 S(make(), 2, 3), S(make(1, 4, noncontig=True), 3, 4)]),
    OpInfo("expand_as", op=lambda m, x, y: x.expand_as(y), covers=("expand",),
           samples=lambda make: [S(make(1, 3), Const(make(2, 3)))]),
    OpInfo("broadcast_to", op=lambda m, x, s: m.broadcast_to(x, s), covers=("expand",),
           samples=lambda make: [S(make(3), (2, 3))]),
    OpInfo("flip", op=lambda m, x, d: m.flip(x, d), covers=("flip",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), (0,)), S(make(2, 3, 4), (0, 2)),
                                 S(make(2, 3), (-1,)), S(make(4, 3, noncontig=True), (0, 1))]),
    OpInfo("cat", op=lambda m, xs, **kw: m.cat(xs, **kw), covers=("cat", "slice_dim",
                                                                   "pad_constant"),
           gradgradcheck=True,
           samples=lambda make: [S([make(2, 3), make(4, 3)]),
                                 S([make(2, 3), make(2, 1), make(2, 2)], dim=1),
                                 S([make(2, 3, 2), make(2, 3, 1)], dim=-1),
                                 S([make(3)]),
                                 S([make(2, 3, noncontig=True), make(1, 3)], dim=0)]),
    OpInfo("stack", op=lambda m, xs, **kw: m.stack(xs, **kw), covers=("cat", "reshape"),
           samples=lambda make: [S([make(2, 3), make(2, 3)]),
                                 S([make(2, 3), make(2, 3), make(2, 3)], dim=-1),
                                 S([make(), make()])]),
    OpInfo("split", op=lambda m, x, s, **kw: m.split(x, s, **kw), covers=("slice_dim",),
           gradgradcheck=True,
           samples=lambda make: [S(make(5, 3), 2), S(make(5, 3), [1, 4]),
                                 S(make(2, 7), 3, dim=1), S(make(2, 4), [1, 0, 3], dim=-1)]),
    OpInfo("chunk", op=lambda m, x, c, **kw: x.chunk(c, **kw), covers=("slice_dim",),
           samples=lambda make: [S(make(5, 3), 2), S(make(2, 6), 3, dim=1),
                                 S(make(2, 3), 5, dim=0)]),
    OpInfo("unbind", op=lambda m, x, **kw: m.unbind(x, **kw), covers=("slice_dim", "reshape"),
           samples=lambda make: [S(make(3, 2)), S(make(2, 3), dim=1)]),
    OpInfo("narrow", op=lambda m, x, d, s, n: m.narrow(x, d, s, n), covers=("slice_dim",),
           samples=lambda make: [S(make(5, 3), 0, 1, 3), S(make(2, 6), -1, 2, 2)]),
    OpInfo("pad_constant", op=lambda m, x, p, **kw: m.nn.functional.pad(x, p, **kw),
           covers=("pad_constant",), gradgradcheck=True,
           samples=lambda make: [S(make(2, 3), (1, 2)), S(make(2, 3, 4), (1, 0, 0, 2)),
                                 S(make(2, 3), (1, 1, 2, 0), value=1.5),
                                 S(make(3, 5), (-1, 2)),                # negative crops
                                 S(make(2, 3, 4), (0, 0, 0, 0, 1, 1))]),
    OpInfo("repeat", op=lambda m, x, *r: x.repeat(*r), covers=("repeat",), gradgradcheck=True,
           samples=lambda make: [S(make(2, 3), 2, 1), S(make(2, 3), 1, 2, 3), S(make(3), 2),
                                 S(make(), 3)]),
    OpInfo("contiguous", op=lambda m, x: x.contiguous() * 1.0, covers=("contiguous", "mul_scalar"),
           samples=lambda make: [S(make(3, 4, noncontig=True)), S(make(3, 4))]),
]


# ---- indexing -------------------------------------------------------------------------
def getitem_samples(make):
    idx = np.array([0, 2, 2, 1, 0])  # repeated indices: their gradients add up
    return [
        S(make(4, 3), 1), S(make(4, 3), -1), S(make(4, 3), (slice(1, 3),)),
        S(make(4, 3, 2), (slice(None), None, 1)),
        S(make(4, 3, 2), (Ellipsis, 0)),
        S(make(4, 5), (slice(0, 4, 2), slice(1, None, 3))),        # steps
        S(make(4, 3), (idx,)),                                     # integer tensor
        S(make(4, 3), [0, 3, 0]),                                  # a list
        S(make(4, 3), (slice(None), make.index(4, 3))),
        S(make(4, 3, 2), (make.index((2, 2), 4), slice(None), make.index((2, 1), 2))),
        S(make(4, 3), (make.index((), 4),)),                       # 0-d index tensor
        S(make(4, 3), (make.mask(4, 3),)),                         # bool masks
        S(make(4, 3), (make.mask(4),)),
        S(make(4, 3, 2), (1, make.mask(3))),
        S(make(4, 3, noncontig=True), (idx, 1)),
        S(make(4, 3), (None, Ellipsis, idx[:3])),
    ]


def _setitem(m, x, v, key):
    y = x * 1.0
    y[key] = v
    return y


INDEXING = [
    OpInfo("getitem", op=lambda m, x, key: x[key], covers=("getitem", "index_put_zeros"),
           gradgradcheck=True, samples=getitem_samples),
    OpInfo("setitem", op=_setitem, covers=("index_put_zeros", "expand", "contiguous"),
           gradgradcheck=True,
           samples=lambda make: [S(make(4, 3), make(3), 1), S(make(4, 3), make(2, 1),
                                                              (slice(1, 3),)),
                                 S(make(4, 3), make(), (make.mask(4, 3),)),
                                 S(make(4, 3), make(2, 3), (np.array([3, 0]),)),
                                 S(make(4, 3), 2.5, (slice(None), 0))]),
    OpInfo("index_select", op=lambda m, x, d, i: m.index_select(x, d, i), covers=("getitem",),
           samples=lambda make: [S(make(4, 3), 0, np.array([3, 0, 3])),
                                 S(make(2, 4, 3), 1, make.index(6, 4)),
                                 S(make(4, 3), -1, make.index(2, 3))]),
    OpInfo("masked_fill", op=lambda m, x, mask, v: x.masked_fill(mask, v), covers=("where",),
           samples=lambda make: [S(make(3, 4), make.mask(3, 4), 0.5),
                                 S(make(3, 4), make.mask(4), -2.0),
                                 S(make(3, 4), make.mask(3, 1), make())]),   # tensor value
    OpInfo("gather", op=lambda m, x, d, i: m.gather(x, d, i), covers=("gather", "scatter_add"),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 1, make.index((3, 6), 4)),
                                 S(make(3, 4), 0, make.index((2, 4), 3)),
                                 S(make(2, 3, 4), -1, make.index((2, 3, 2), 4)),
                                 S(make(3, 4, noncontig=True), 1, make.index((3, 1), 4))]),
    OpInfo("scatter_add", op=lambda m, x, d, i, s: m.scatter_add(x, d, i, s),
           covers=("scatter_add", "gather"), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), 1, make.index((3, 6), 4), make(3, 6)),
                                 S(make(3, 4), 0, make.index((5, 4), 3), make(5, 4)),
                                 # src larger than index: torch's backward rejects it
                                 # (gradcheck still checks ours)
                                 S(make(3, 4), 0, make.index((2, 2), 3), make(3, 4),
                                   skip=("backward",))]),
]


# ---- matrix products ------------------------------------------------------------------
LINALG = [
    OpInfo("matmul", op=lambda m, a, b: a @ b, covers=("matmul",), gradgradcheck=True,
           dtypes=FL, tol={float16: (2e-2, 2e-2)},
           samples=lambda make: [S(make(3, 4), make(4, 5)), S(make(4), make(4)),
                                 S(make(4), make(4, 2)), S(make(3, 4), make(4)),
                                 S(make(2, 3, 4), make(4, 5)), S(make(3, 4), make(2, 4, 5)),
                                 S(make(2, 1, 3, 4), make(3, 4, 2)),    # batch broadcast
                                 S(make(2, 3, 4), make(4)), S(make(4), make(2, 4, 3)),
                                 S(make(3, 4, noncontig=True), make(4, 2, noncontig=True))]),
    OpInfo("mm", op=lambda m, a, b: m.mm(a, b), covers=("matmul",),
           samples=lambda make: [S(make(3, 4), make(4, 2)), S(make(1, 1), make(1, 3))]),
    OpInfo("bmm", op=lambda m, a, b: a.bmm(b), covers=("matmul",),
           samples=lambda make: [S(make(2, 3, 4), make(2, 4, 2))]),
    OpInfo("dot", op=lambda m, a, b: m.dot(a, b), covers=("matmul",),
           samples=lambda make: [S(make(5), make(5))]),
    OpInfo("outer", op=lambda m, a, b: m.outer(a, b), covers=("mul", "reshape"),
           samples=lambda make: [S(make(3), make(4))]),
]


# ---- softmax family -------------------------------------------------------------------
def softmax_samples(make):
    return [
        S(make(3, 5), dim=1), S(make(3, 5), dim=0), S(make(2, 3, 4), dim=1),
        S(make(2, 3, 4), dim=-1), S(make(6), dim=0), S(make(), dim=0),
        S(make(4, 5, noncontig=True), dim=-1),
        S(make(2, 4) * 500, dim=1),                   # large logits: stable, no overflow
    ]


NN = [
    OpInfo("softmax", op=lambda m, x, **kw: m.softmax(x, **kw),
           covers=("softmax", "softmax_backward"), kernels=("softmax", "softmax_backward"),
           gradgradcheck=True, samples=softmax_samples),
    OpInfo("log_softmax", op=lambda m, x, **kw: x.log_softmax(**kw),
           covers=("log_softmax", "log_softmax_backward"),
           kernels=("log_softmax", "log_softmax_backward"), gradgradcheck=True,
           samples=softmax_samples),
    OpInfo("softmax_masked", op=lambda m, x: m.softmax(x, 1), covers=("softmax",),
           kernels=("softmax", "softmax_backward"), gradcheck=False,
           # -inf entries (attention-style masks) get probability 0, no NaN
           samples=lambda make: [S(np.where(np.eye(3, 4, dtype=bool), -np.inf,
                                            make(3, 4)).astype(make.dtype))]),
]


# ---- devices --------------------------------------------------------------------------
def _other_device(x):
    return "cpu" if x.device.type == "cuda" else "cuda"


DEVICE = [
    OpInfo("to_device", op=lambda m, x: x.to(_other_device(x)).exp().to(x.device),
           ref=lambda m, x: x.exp(), covers=("to_device", "exp"), needs_cuda=True,
           gradgradcheck=True, samples=lambda make: [S(make(3, 4)), S(make())]),
    OpInfo("cuda_cpu_methods", op=lambda m, x: (x.cuda() * 2).cpu() if x.device.type == "cpu"
           else (x.cpu() * 2).cuda(), ref=lambda m, x: x * 2, covers=("to_device", "mul_scalar"),
           needs_cuda=True, samples=lambda make: [S(make(2, 3))]),
]


OPS = ELEMENTWISE + REDUCTIONS + SHAPES + INDEXING + LINALG + NN + DEVICE
