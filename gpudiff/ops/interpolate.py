"""Nearest-neighbour resampling: 'interpolate' and its adjoint 'interpolate_backward' (modes
nearest and nearest-exact; F.interpolate is in gpudiff/nn/functional.py).
"""

import numpy as np

from . import Op
from .lowp import compute_in_float32


def nearest_indices(n_in, n_out, scale, exact):
    """int64 source index of each of n_out outputs, with PyTorch's float32 arithmetic.

    ``scale`` is the user's scale factor (None when a size was given); the step is then
    1 / scale, else n_in / n_out."""
    j = np.arange(n_out)
    if not exact:
        if n_out == n_in:
            return j
        if n_out == 2 * n_in:
            return j >> 1
    step = np.float32(1.0 / scale) if scale is not None and scale > 0 \
        else np.float32(n_in) / np.float32(n_out)
    if exact:
        src = np.floor(((j + 0.5) * np.float64(step)).astype(np.float32))
    else:
        src = np.floor(j.astype(np.float32) * step)
    return np.minimum(src.astype(np.int64), n_in - 1)


def _one_hot_rows(xp, idx, n_in, dtype):
    """(n_in, n_out) 0/1 matrix with column j selecting row idx[j]."""
    m = np.zeros((n_in, len(idx)), dtype)
    m[idx, np.arange(len(idx))] = 1
    return xp.asarray(m)


class interpolate(Op):
    """Nearest resampling of the spatial dims (2..) of an (N, C, *spatial) input."""


    def forward(ctx, x, *, output_size, scales, exact):
        ctx.p = {"output_size": output_size, "scales": scales, "exact": exact}
        ctx.in_size = x.shape[2:]
        y = x
        for d, (n_in, n_out, s) in enumerate(zip(x.shape[2:], output_size, scales)):
            idx = nearest_indices(n_in, n_out, s, exact)
            if n_out != n_in or (idx != np.arange(n_in)).any():
                y = ctx.xp.take(y, ctx.xp.asarray(idx), axis=2 + d)
        return ctx.xp.ascontiguousarray(y) if y is not x else y.copy()

    def backward(ctx, gy):
        return interpolate_backward.apply(gy, input_size=ctx.in_size, **ctx.p)


class interpolate_backward(Op):
    """The adjoint of InterpolateOp: each output's gradient added to its source element."""


    def forward(ctx, gy, *, input_size, output_size, scales, exact):
        ctx.p = {"output_size": output_size, "scales": scales, "exact": exact}
        xp = ctx.xp
        g = gy
        for d, (n_in, n_out, s) in enumerate(zip(input_size, output_size, scales)):
            idx = nearest_indices(n_in, n_out, s, exact)
            if n_out == n_in and (idx == np.arange(n_in)).all():
                continue
            # sum over the outputs that copied each source: (..., n_out) @ (n_out, n_in)
            g = xp.moveaxis(g, 2 + d, -1)
            g = xp.matmul(g, _one_hot_rows(xp, idx, n_in, gy.dtype).T)
            g = xp.moveaxis(g, -1, 2 + d)
        return xp.ascontiguousarray(g) if g is not gy else g.copy()

    def backward(ctx, ggx):
        return interpolate.apply(ggx, **ctx.p)


compute_in_float32(interpolate, interpolate_backward)
