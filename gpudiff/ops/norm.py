"""Batch normalisation over dim 1 (the public function is nn.functional.batch_norm).

  'batch_norm'            y = (x - mean) * invstd * w + b per channel (dim 1); training uses
                          the batch statistics and updates the running ones in place
                          (momentum, unbiased variance), eval uses the running ones
                          (its first backward is one fused kernel call; with
                          create_graph=True it is written in gpudiff ops, so double
                          backward works)
"""
from .. import runtime
from ..autograd.grad_mode import is_grad_enabled
from ..tensor import Tensor
from . import Op
from .lowp import compute_in_float32


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


class batch_norm(Op):
    writes = ("running_mean", "running_var")  # updated in place when training

    def forward(ctx, x, weight, bias, running_mean, running_var, *, training, momentum, eps):
        ctx.training, ctx.eps = training, eps
        k = ctx.kernel("batch_norm")
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

    def backward_arrays(ctx, gy):
        if not ctx.training:  # eval: the composite formula, on Tensors
            return NotImplemented
        x, w, mean, invstd = ctx.saved_arrays
        nx, nw, nb = ctx.needs_input_grad[:3]
        gx, gw, gb = _batch_norm_backward_arrays(ctx.device, gy, x, w, mean, invstd)
        return (gx if nx else None, gw if nw else None, gb if nb else None, None, None)


def _batch_norm_backward_fused(gy, x, w, mean, invstd):
    """(gx, gw, gb) of training-mode batch norm in one kernel call (no graph is recorded
    here: the engine runs a first backward under no_grad)."""
    dev = x.device
    out = _batch_norm_backward_arrays(dev, gy.array, x.array, None if w is None else w.array,
                                      mean.array, invstd.array)
    return tuple(Tensor._make(a, dev) for a in out)


def _batch_norm_backward_arrays(dev, gy, x, w, mean, invstd):
    """The same on raw arrays of device ``dev``."""
    k = runtime.kernel(dev, "batch_norm_backward")
    out = k(gy, x, w, mean, invstd) if k else None
    if out is None:
        out = batch_norm_backward_ref(dev.xp, gy, x, w, mean, invstd)
    return tuple(a.astype(x.dtype, copy=False) for a in out)


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


compute_in_float32(batch_norm)  # float32 statistics beside float16 / bfloat16 activations
