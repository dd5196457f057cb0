"""Activations: relu, leaky_relu, sigmoid, tanh (each with its ``*_backward`` op, named as its
kernel), elu, softplus, erf.

Forward and backward use the device's fast kernel when it has one and the xp-generic reference
otherwise. Backward rules call ``*_backward`` ops so they stay differentiable (double backward)
while the first backward still runs the fused kernel.
"""
import math

from .. import runtime
from . import Op, forward_of
from .lowp import compute_in_float32
from . import run_kernel as _run


class relu(Op):
    def forward(ctx, x):
        y = _run(ctx, "relu", x)
        if y is None:
            y = ctx.xp.maximum(x, 0).astype(x.dtype, copy=False)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return relu_backward.apply(gy, y)

    def backward_arrays(ctx, gy):
        y, = ctx.saved_arrays
        return forward_of(relu_backward, ctx, gy, y)


class relu_backward(Op):
    """gx = gy * (y > 0): relu's backward from its saved output."""

    def forward(ctx, gy, y):
        ctx.save_for_backward(y)
        gx = _run(ctx, "relu_backward", y, gy)
        return gx if gx is not None else gy * (y > 0)

    def backward(ctx, ggx):
        y, = ctx.saved_tensors
        return relu_backward.apply(ggx, y), None


class leaky_relu(Op):
    def forward(ctx, x, *, negative_slope=0.01):
        ctx.slope = negative_slope
        ctx.save_for_backward(x)
        y = _run(ctx, "leaky_relu", x, negative_slope)
        if y is not None:
            return y
        return ctx.xp.where(x > 0, x, x * x.dtype.type(negative_slope))

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return leaky_relu_backward.apply(gy, x, negative_slope=ctx.slope)

    def backward_arrays(ctx, gy):
        x, = ctx.saved_arrays
        return forward_of(leaky_relu_backward, ctx, gy, x, negative_slope=ctx.slope)


class leaky_relu_backward(Op):
    def forward(ctx, gy, x, *, negative_slope):
        ctx.slope = negative_slope
        ctx.save_for_backward(x)
        gx = _run(ctx, "leaky_relu_backward", x, gy, negative_slope)
        if gx is not None:
            return gx
        return ctx.xp.where(x > 0, gy, gy * gy.dtype.type(negative_slope))

    def backward(ctx, ggx):
        x, = ctx.saved_tensors
        return leaky_relu_backward.apply(ggx, x, negative_slope=ctx.slope), None


class sigmoid(Op):
    def forward(ctx, x):
        y = _run(ctx, "sigmoid", x)
        if y is None:  # stable for large |x|: exp of a non-positive number only
            xp = ctx.xp
            e = xp.exp(-xp.abs(x))
            y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return sigmoid_backward.apply(gy, y)

    def backward_arrays(ctx, gy):
        y, = ctx.saved_arrays
        return forward_of(sigmoid_backward, ctx, gy, y)


class sigmoid_backward(Op):
    """Fused gx = gy * y * (1 - y) from the saved output."""

    def forward(ctx, gy, y):
        ctx.save_for_backward(gy, y)
        gx = _run(ctx, "sigmoid_backward", y, gy)
        return gx if gx is not None else gy * y * (1 - y)

    def backward(ctx, ggx):
        gy, y = ctx.saved_tensors
        return ggx * y * (1 - y), ggx * gy * (1 - 2 * y)


class tanh(Op):
    def forward(ctx, x):
        y = _run(ctx, "tanh", x)
        if y is None:
            y = ctx.xp.tanh(x)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return tanh_backward.apply(gy, y)

    def backward_arrays(ctx, gy):
        y, = ctx.saved_arrays
        return forward_of(tanh_backward, ctx, gy, y)


class tanh_backward(Op):
    def forward(ctx, gy, y):
        ctx.save_for_backward(gy, y)
        gx = _run(ctx, "tanh_backward", y, gy)
        return gx if gx is not None else gy * (1 - y * y)

    def backward(ctx, ggx):
        gy, y = ctx.saved_tensors
        return ggx * (1 - y * y), ggx * gy * -2 * y


class elu(Op):
    def forward(ctx, x, *, alpha=1.0):
        xp = ctx.xp
        ctx.alpha = alpha
        ctx.save_for_backward(x)
        return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0))).astype(x.dtype, copy=False)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        neg = x.clamp(max=0.0)
        return gy * (x > 0).to(gy.dtype) + gy * (x <= 0).to(gy.dtype) * ctx.alpha * neg.exp()


class softplus(Op):
    """log(1 + exp(beta x)) / beta, linear above ``threshold`` (as torch)."""

    def forward(ctx, x, *, beta=1.0, threshold=20.0):
        xp = ctx.xp
        ctx.beta, ctx.threshold = beta, threshold
        ctx.save_for_backward(x)
        bx = beta * x
        soft = (xp.maximum(bx, 0) + xp.log1p(xp.exp(-xp.abs(bx)))) / beta
        return xp.where(bx > threshold, x, soft).astype(x.dtype, copy=False)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        bx = x * ctx.beta
        lin = (bx > ctx.threshold).to(gy.dtype)
        return gy * (lin + (1 - lin) * bx.sigmoid())


class erf(Op):
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return runtime.erf(x)

    def backward(ctx, gy):
        x, = ctx.saved_tensors
        return gy * (2 / math.sqrt(math.pi)) * (-(x * x)).exp()


# float16 / bfloat16 in float32: the same values as NumPy's / ml_dtypes' per-element loops
# (each computes in float32 and rounds), but through the float32 kernels, several times faster
compute_in_float32(relu, relu_backward, leaky_relu, leaky_relu_backward, sigmoid,
                   sigmoid_backward, tanh, tanh_backward, elu, softplus, erf)
