"""Batch normalisation, dropout (element-wise and channel-wise) and nearest interpolation.

Primitive ops (registry names in quotes):

  'batch_norm'            y = (x - mean) * invstd * w + b per channel (dim 1); training uses
                          the batch statistics and updates the running ones in place
                          (momentum, unbiased variance), eval uses the running ones
                          (its first backward is one fused kernel call; with
                          create_graph=True it is written in gpudiff ops, so double
                          backward works)
  'dropout'               y = x * keep(i // group) / (1 - p): group 1 is F.dropout, group
                          H*W is F.dropout2d (one draw per channel); linear in x, so its
                          gradient is the same op with the same seed
  'interpolate'  <->  'interpolate_backward'   nearest / nearest-exact resampling

Dropout masks are counter-based: keep(j) is a hash of (seed, j) (csrc/cpu/norm.cpp gives the
formula; ``dropout_keep_ref`` is the same in xp), seed drawn from gpudiff's generator per
call. Nothing is stored for the backward, and kernel and reference agree bit for bit.
"""
import math

import numpy as np

from .. import runtime
from ..autograd.grad_mode import is_grad_enabled
from . import Op


# ---- batch norm -----------------------------------------------------------------------
def _stat_dims(ndim):
    return (0,) + tuple(range(2, ndim))


def _per_channel(a, ndim):
    """(C,) -> broadcastable against (N, C, *)."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_forward_ref(xp, x, weight, bias, running_mean, running_var, training, momentum,
                           eps):
    dims = _stat_dims(x.ndim)
    if training:
        mean = x.mean(axis=dims)
        var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=dims)
        n = x.size // x.shape[1]
        if running_mean is not None:
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        if running_var is not None:
            running_var[...] = (1 - momentum) * running_var + momentum * var * (n / max(n - 1, 1))
    else:
        mean, var = running_mean.astype(x.dtype), running_var.astype(x.dtype)
    invstd = (1 / xp.sqrt(var + eps)).astype(x.dtype)
    scale = invstd if weight is None else invstd * weight
    y = (x - _per_channel(mean, x.ndim)) * _per_channel(scale, x.ndim)
    if bias is not None:
        y += _per_channel(bias, x.ndim)
    return y.astype(x.dtype, copy=False), mean.astype(x.dtype), invstd


def batch_norm_backward_ref(xp, gy, x, weight, mean, invstd):
    dims = _stat_dims(x.ndim)
    M = x.size // x.shape[1]
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(invstd, x.ndim)
    sum_gy = gy.sum(axis=dims)
    sum_gy_xhat = (gy * xhat).sum(axis=dims)
    w = invstd if weight is None else weight * invstd
    gx = _per_channel(w, x.ndim) * (gy - _per_channel(sum_gy / M, x.ndim)
                                    - xhat * _per_channel(sum_gy_xhat / M, x.ndim))
    return gx.astype(x.dtype, copy=False), sum_gy_xhat, sum_gy


class BatchNormOp(Op):
    name = "batch_norm"

    def forward(ctx, x, weight, bias, running_mean, running_var, *, training, momentum, eps):
        ctx.training, ctx.eps = training, eps
        k = ctx.kernel("batch_norm_forward")
        out = k(x, weight, bias, running_mean, running_var, training, momentum, eps) if k \
            else None
        if out is None:
            out = batch_norm_forward_ref(ctx.xp, x, weight, bias, running_mean, running_var,
                                         training, momentum, eps)
        y, mean, invstd = out
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    def backward(ctx, gy):
        x, w, mean, invstd = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        if ctx.training and not is_grad_enabled():   # a first backward: the fused kernel
            gx, gw, gb = _batch_norm_backward_fused(gy, x, w, mean, invstd)
        else:  # create_graph (or eval): composite, differentiable in x, w and gy
            gx, gw, gb = _batch_norm_backward_composite(gy, x, w, mean, invstd, ctx.training,
                                                        ctx.eps)
        return (gx if nx else None, gw if nw else None, gb if nb else None, None, None)


def _batch_norm_backward_fused(gy, x, w, mean, invstd):
    """(gx, gw, gb) of training-mode batch norm in one kernel call (no graph is recorded
    here: the engine runs a first backward under no_grad)."""
    from ..tensor import Tensor
    dev = x.device
    arrays = (gy.array, x.array, None if w is None else w.array, mean.array, invstd.array)
    k = runtime.kernel(dev, "batch_norm_backward")
    out = k(*arrays) if k else None
    if out is None:
        out = batch_norm_backward_ref(dev.xp, *arrays)
    return tuple(Tensor._make(a.astype(x.dtype, copy=False), dev) for a in out)


def _batch_norm_backward_composite(gy, x, w, mean, invstd, training, eps):
    dims = _stat_dims(x.ndim)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if training:  # the statistics depend on x: recompute them with graph
        mu = x.mean(dims, keepdim=True)
        xmu = x - mu
        inv = ((xmu * xmu).mean(dims, keepdim=True) + eps).rsqrt()
    else:         # running statistics: constants
        xmu = x - mean.reshape(shape)
        inv = invstd.reshape(shape)
    xhat = xmu * inv
    gyw = gy if w is None else gy * w.reshape(shape)
    if training:
        gx = inv * (gyw - gyw.mean(dims, keepdim=True)
                    - xhat * (gyw * xhat).mean(dims, keepdim=True))
    else:
        gx = gyw * inv
    return gx, (gy * xhat).sum(dims), gy.sum(dims)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over dim 1 of an (N, C) or (N, C, *) input, as
    torch.nn.functional.batch_norm (running statistics updated in place when training).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> x = gpudiff.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> [[round(v, 4) for v in row] for row in F.batch_norm(x, None, None, training=True).tolist()]
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    name = "batch_norm"
    if input.ndim < 2:
        raise ValueError(f"{name}: expected an (N, C, *) input, got shape {tuple(input.shape)}")
    if input.dtype.kind != "f":
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")
    C = input.shape[1]
    if training:
        if input.numel() // C == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(input.shape)}")
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif running_mean is None or running_var is None:
        raise RuntimeError(f"{name}: running_mean and running_var must be given in evaluation "
                           f"mode (training=False)")
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (C,):
            raise RuntimeError(f"{name}: expected {what} of shape ({C},), got {tuple(t.shape)}")
    y = BatchNormOp.apply(input, weight, bias, running_mean, running_var,
                          training=bool(training), momentum=float(momentum or 0.0),
                          eps=float(eps))
    if training:  # the buffers changed in place: tensors that saved them must notice
        for t in (running_mean, running_var):
            if t is not None:
                t._version[0] += 1
    return y


# ---- dropout --------------------------------------------------------------------------
_MIX1, _MIX2 = 0x21F0AAAD, 0x735A2D97


def _mix32(xp, v):
    """The 32-bit integer hash of norm.cpp, on uint32 arrays (wrapping arithmetic)."""
    v = v ^ (v >> 16)
    v = v * xp.uint32(_MIX1)
    v = v ^ (v >> 15)
    v = v * xp.uint32(_MIX2)
    return v ^ (v >> 15)


def _mix32_int(v):
    v &= 0xFFFFFFFF
    v ^= v >> 16
    v = (v * _MIX1) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * _MIX2) & 0xFFFFFFFF
    return v ^ (v >> 15)


def dropout_keep_ref(xp, count, p, seed):
    """keep[j] for j < count: True with probability 1 - p (to 2^-24), a hash of (seed, j)."""
    k0 = _mix32_int((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    k1 = _mix32_int((seed >> 32) ^ 0x85EBCA6B)
    j = xp.arange(count, dtype=np.uint64)
    lo, hi = (j & 0xFFFFFFFF).astype(np.uint32), (j >> 32).astype(np.uint32)
    h = _mix32(xp, _mix32(xp, lo ^ xp.uint32(k0)) + xp.uint32(k1) + hi)
    return (h >> 8) >= math.ceil(p * 16777216.0)


def dropout_ref(xp, x, p, seed, group):
    keep = dropout_keep_ref(xp, x.size // group, p, seed)
    scale = x.dtype.type(1 / (1 - p)) if p < 1 else x.dtype.type(0)
    m = xp.where(keep, scale, x.dtype.type(0)).astype(x.dtype)
    return (x.reshape(-1, group) * m[:, None]).reshape(x.shape)


class DropoutOp(Op):
    """y = x * keep(i // group) / (1 - p), with keep a hash of (seed, i // group)."""

    name = "dropout"

    def forward(ctx, x, *, p, seed, group):
        ctx.p = {"p": p, "seed": seed, "group": group}
        k = ctx.kernel("dropout")
        y = k(x, p, seed, group) if k else None
        return dropout_ref(ctx.xp, x, p, seed, group) if y is None else y

    def backward(ctx, gy):
        return DropoutOp.apply(gy, **ctx.p)  # linear in x: the same mask, the same scale


def _draw_seed():
    return int(runtime.rng().integers(0, 2**63))


def _dropout(name, input, p, training, inplace, group):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if input.dtype.kind != "f":
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")
    out = DropoutOp.apply(input, p=float(p), seed=_draw_seed(), group=group)
    return input._inplace(out) if inplace else out


def dropout(input, p=0.5, training=True, inplace=False):
    """Zero each element with probability p and scale the rest by 1 / (1 - p), as
    torch.nn.functional.dropout (the input itself when not training or p == 0).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.dropout(gpudiff.ones(4), 0.5, training=False).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    return _dropout("dropout", input, p, training, inplace, 1)


def dropout2d(input, p=0.5, training=True, inplace=False):
    """Zero whole channels (dim 1 of an (N, C, *) input) with probability p, scaling the
    rest by 1 / (1 - p), as torch.nn.functional.dropout2d (a 3-D input is (N, C, L))."""
    if input.ndim not in (3, 4):
        import warnings
        warnings.warn(f"dropout2d: Received a {input.ndim}-D input to dropout2d, which is "
                      f"deprecated; dropout2d expects 3-D or 4-D inputs", stacklevel=2)
    group = int(np.prod(input.shape[2:], dtype=np.int64)) if input.ndim >= 2 else 1
    return _dropout("dropout2d", input, p, training, inplace, max(group, 1))


# ---- nearest interpolation ------------------------------------------------------------
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


class InterpolateOp(Op):
    """Nearest resampling of the spatial dims (2..) of an (N, C, *spatial) input."""

    name = "interpolate"

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
        return InterpolateBackward.apply(gy, input_size=ctx.in_size, **ctx.p)


class InterpolateBackward(Op):
    """The adjoint of InterpolateOp: each output's gradient added to its source element."""

    name = "interpolate_backward"

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
        return InterpolateOp.apply(ggx, **ctx.p)


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    """Resample the spatial dims of an (N, C, *spatial) input; modes 'nearest' and
    'nearest-exact' (as torch.nn.functional.interpolate).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.interpolate(gpudiff.tensor([[[1.0, 2.0]]]), scale_factor=2).tolist()
    [[[1.0, 1.0, 2.0, 2.0]]]
    """
    name = "interpolate"
    if mode not in ("nearest", "nearest-exact"):
        raise NotImplementedError(f"{name}: mode {mode!r} is not supported (only 'nearest' and "
                                  f"'nearest-exact')")
    if align_corners is not None:
        raise ValueError("align_corners option can only be set with the interpolating modes: "
                         "linear | bilinear | bicubic | trilinear")
    if antialias:
        raise ValueError(f"{name}: anti-alias is not supported for mode {mode!r}")
    dim = input.ndim - 2
    if dim < 1:
        raise ValueError(f"{name}: expected an (N, C, *spatial) input, got shape "
                         f"{tuple(input.shape)}")
    if (size is None) == (scale_factor is None):
        raise ValueError("only one of size or scale_factor should be defined" if size is not None
                         else "either size or scale_factor should be defined")
    in_size = tuple(input.shape[2:])
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
        out = tuple(size) if isinstance(size, (tuple, list)) else (size,) * dim
        if len(out) != dim:
            raise ValueError(f"Input and output must have the same number of spatial dimensions,"
                             f" but got input with spatial dimensions of {list(in_size)} and "
                             f"output size of {size}.")
        out = tuple(int(s) for s in out)
        scales = (None,) * dim
    else:
        sf = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) \
            else (scale_factor,) * dim
        if len(sf) != dim:
            raise ValueError(f"Input and scale_factor must have the same number of spatial "
                             f"dimensions, but got input with spatial dimensions of "
                             f"{list(in_size)} and scale_factor of shape {scale_factor}.")
        out = tuple(math.floor(n * float(s)) for n, s in zip(in_size, sf))
        scales = (None,) * dim if recompute_scale_factor else tuple(float(s) for s in sf)
    if min(out) < 1:
        raise RuntimeError(f"{name}: output size {out} must be positive (input {in_size})")
    return InterpolateOp.apply(input, output_size=out, scales=scales,
                               exact=mode == "nearest-exact")

