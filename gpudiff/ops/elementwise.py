"""Elementwise ops: broadcasting binary arithmetic and unary math.

Binary ops broadcast like NumPy; their backward sums the gradient back to each input's
shape with ``sum_to`` (the one place broadcasting is undone).
"""
from ..runtime import autocast
from ..runtime.dtypes import is_floating
from ..tensor import Tensor
from . import Op


def sum_to(g, shape):
    """Sum ``g`` (a Tensor or a raw array) down to ``shape``: undo broadcasting.
    (..., *shape) -> shape"""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and g.shape[i + lead] != 1)
    if axes:
        g = g.sum(dim=axes, keepdim=True) if isinstance(g, Tensor) else \
            g.sum(axis=axes, keepdims=True)
    return g.reshape(shape) if g.shape != shape else g


# ---- binary ---------------------------------------------------------------------------
class add(Op):
    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return ctx.xp.add(a, b)

    def backward(ctx, gy):
        sa, sb = ctx.shapes
        return sum_to(gy, sa), sum_to(gy, sb)

    def backward_arrays(ctx, gy):
        sa, sb = ctx.shapes
        return sum_to(gy, sa), sum_to(gy, sb)


class sub(Op):
    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return ctx.xp.subtract(a, b)

    def backward(ctx, gy):
        sa, sb = ctx.shapes
        return sum_to(gy, sa), sum_to(-gy, sb)

    def backward_arrays(ctx, gy):
        sa, sb = ctx.shapes
        return sum_to(gy, sa), sum_to(-gy, sb)


class add_scalar(Op):
    """a + s for a Python number s: no 0-d tensor to make, nothing to save."""

    def forward(ctx, a, *, other):
        return ctx.xp.add(a, a.dtype.type(other))

    def backward(ctx, gy):
        return gy

    def backward_arrays(ctx, gy):
        return gy


class mul_scalar(Op):
    """a * s for a Python number s: no 0-d tensor to make, nothing to save."""

    def forward(ctx, a, *, other):
        ctx.other = other
        return ctx.xp.multiply(a, a.dtype.type(other))

    def backward(ctx, gy):
        return mul_scalar.apply(gy, other=ctx.other)

    def backward_arrays(ctx, gy):
        return gy * gy.dtype.type(ctx.other)


class mul(Op):
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.multiply(a, b)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (sum_to(gy * b, a.shape) if na else None,
                sum_to(gy * a, b.shape) if nb else None)

    def backward_arrays(ctx, gy):
        a, b = ctx.saved_arrays
        na, nb = ctx.needs_input_grad
        return (sum_to(gy * b, a.shape) if na else None,
                sum_to(gy * a, b.shape) if nb else None)


class div(Op):
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.true_divide(a, b)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (sum_to(gy / b, a.shape) if na else None,
                sum_to(-gy * a / (b * b), b.shape) if nb else None)

    def backward_arrays(ctx, gy):
        a, b = ctx.saved_arrays
        na, nb = ctx.needs_input_grad
        return (sum_to(gy / b, a.shape) if na else None,
                sum_to(-gy * a / (b * b), b.shape) if nb else None)


class pow(Op):
    """a ** b, both tensors (a Python exponent goes to ``pow_scalar``)."""

    def forward(ctx, a, b):
        y = ctx.xp.power(a, b)
        ctx.save_for_backward(a, b, y)
        return y

    def backward(ctx, gy):
        a, b, y = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga = sum_to(gy * b * a ** (b - 1), a.shape) if na else None
        # d/db a**b = a**b * log(a); defined as 0 where a == 0 (as PyTorch does)
        gb = sum_to(gy * y * a.masked_fill(a == 0, 1.0).log(), b.shape) if nb else None
        return ga, gb


class pow_scalar(Op):
    def forward(ctx, a, *, exponent):
        ctx.exponent = exponent
        ctx.save_for_backward(a)
        if is_floating(a.dtype):
            return ctx.xp.power(a, a.dtype.type(exponent))
        return (a ** exponent).astype(a.dtype, copy=False)  # NumPy: bool ** True is int8

    def backward(ctx, gy):
        a, = ctx.saved_tensors
        e = ctx.exponent
        if e == 0:
            return gy * 0.0
        return gy * e * (a ** (e - 1) if e != 2 else a)


class rpow_scalar(Op):
    """base ** a for a Python number base."""

    def forward(ctx, a, *, base):
        y = ctx.xp.power(a.dtype.type(base), a)
        ctx.base = base
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        import math
        return gy * y * (math.log(ctx.base) if ctx.base > 0 else float("nan"))


class maximum(Op):
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.maximum(a, b)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        # ties split the gradient in half, as PyTorch does
        wa = (a > b).to(gy.dtype) + (a == b).to(gy.dtype) * 0.5
        return sum_to(gy * wa, a.shape), sum_to(gy * (1 - wa), b.shape)


class minimum(Op):
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.minimum(a, b)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        wa = (a < b).to(gy.dtype) + (a == b).to(gy.dtype) * 0.5
        return sum_to(gy * wa, a.shape), sum_to(gy * (1 - wa), b.shape)


class where(Op):
    """where(condition, a, b); the condition is a bool tensor (no gradient)."""

    def forward(ctx, cond, a, b):
        ctx.save_for_backward(cond)
        ctx.shapes = a.shape, b.shape
        return ctx.xp.where(cond, a, b)

    def backward(ctx, gy):
        cond, = ctx.saved_tensors
        sa, sb = ctx.shapes
        zero = gy * 0
        return None, sum_to(gy.where(cond, zero), sa), sum_to(zero.where(cond, gy), sb)


class remainder(Op):
    """Python-style modulo (sign of the divisor), like torch.remainder."""

    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.remainder(a, b)

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        return sum_to(gy, a.shape), sum_to(-gy * (a / b).floor(), b.shape)


class floor_divide(Op):
    """Piecewise constant: zero gradients (as torch), not "no gradient"."""

    def forward(ctx, a, b):
        ctx.shapes = a.shape, b.shape
        return ctx.xp.floor_divide(a, b)

    def backward(ctx, gy):
        sa, sb = ctx.shapes
        return gy.new_zeros(sa), gy.new_zeros(sb)


def _compare(ufunc_name):
    """The comparison op ``ufunc_name`` (a class of that name: no gradient, bool output)."""
    def forward(ctx, a, b):
        return getattr(ctx.xp, ufunc_name)(a, b)
    return type(ufunc_name, (Op,), {"differentiable": False, "forward": forward,
                                    "__module__": __name__})


eq, ne, gt, lt, ge, le = (_compare(n) for n in (
    "equal", "not_equal", "greater", "less", "greater_equal", "less_equal"))


class logical_not(Op):
    differentiable = False

    def forward(ctx, a):
        return ctx.xp.logical_not(a)


class logical_and(Op):
    differentiable = False

    def forward(ctx, a, b):
        return ctx.xp.logical_and(a, b)


class logical_or(Op):
    differentiable = False

    def forward(ctx, a, b):
        return ctx.xp.logical_or(a, b)


# ---- unary ----------------------------------------------------------------------------
class neg(Op):
    def forward(ctx, x):
        return ctx.xp.negative(x)

    def backward(ctx, gy):
        return -gy


class exp(Op):
    def forward(ctx, x):
        y = ctx.xp.exp(x)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return gy * y


class log(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.log(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return gy / x


class log1p(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.log1p(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return gy / (x + 1)


class sqrt(Op):
    def forward(ctx, x):
        y = ctx.xp.sqrt(x)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return gy / (2 * y)


class rsqrt(Op):
    def forward(ctx, x):
        y = (1 / ctx.xp.sqrt(x)).astype(x.dtype, copy=False)
        ctx.save_for_backward(y)  # the returned object itself: saved as the op's output
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return gy * -0.5 * y * y * y


class sin(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.sin(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return gy * x.cos()


class cos(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.cos(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return -gy * x.sin()


class abs(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.abs(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return gy * x.sign()


class _PiecewiseConstant:
    """Zero gradient wherever defined. Still recorded, as in torch: ``x.round()`` requires
    grad, so a loss reached only through it backpropagates zeros instead of raising."""

    def backward(ctx, gy):
        return gy.new_zeros(gy.shape)


class sign(_PiecewiseConstant, Op):
    def forward(ctx, x):
        return ctx.xp.sign(x)


class floor(_PiecewiseConstant, Op):
    def forward(ctx, x):
        return ctx.xp.floor(x)


class ceil(_PiecewiseConstant, Op):
    def forward(ctx, x):
        return ctx.xp.ceil(x)


class round(_PiecewiseConstant, Op):
    def forward(ctx, x):
        return ctx.xp.round(x)


class clamp(Op):
    """clamp(x, min, max) with Python-number bounds; gradient 1 inside [min, max]."""

    def forward(ctx, x, *, min=None, max=None):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = min, max
        return ctx.xp.clip(x, min, max).astype(x.dtype, copy=False)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        inside = None
        if ctx.lo is not None:
            inside = x >= ctx.lo
        if ctx.hi is not None:
            le = x <= ctx.hi
            inside = le if inside is None else inside.logical_and(le)
        return gy * inside.to(gy.dtype)


class to_dtype(Op):
    """Cast; gradient cast back (no gradient to integer inputs)."""

    def forward(ctx, x, *, dtype):
        ctx.src = x.dtype
        return x.astype(dtype)

    def backward(ctx, gy):
        return gy.to(ctx.src) if is_floating(ctx.src) else None

    def backward_arrays(ctx, gy):
        return gy.astype(ctx.src) if is_floating(ctx.src) else None


autocast.set_cast(lambda t, dtype: to_dtype.apply(t, dtype=dtype))  # autocast's cast


class clone(Op):
    def forward(ctx, x):
        return x.copy()

    def backward(ctx, gy):
        return gy
