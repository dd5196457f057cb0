"""Batch norm kernels of csrc/cuda/batch_norm.cu: training forward (Welford statistics, running
stats updated in place), eval forward, backward; a block per channel (or per plane).
"""
import math

import numpy as np

from ..kernels import register_kernel
from .launch import THREADS, array_module, ctype, fits_int32, grid_1d, launch, wave_blocks

BN_MAX_THREADS = 512
BN_CACHE_BYTES = 48 << 10  # shared memory keeping the first values of a channel between passes


def _bn_cache(m, itemsize, arrays):
    """(values kept per array, shared-memory bytes) for a channel of m values."""
    keep = min(m, BN_CACHE_BYTES // (itemsize * arrays))
    return keep, keep * itemsize * arrays


def _bn_layout(x):
    """(N, C, HW) of x (N, C, *spatial)."""
    n, c = int(x.shape[0]), int(x.shape[1])
    hw = int(np.prod(x.shape[2:], dtype=np.int64)) if x.ndim > 2 else 1
    return n, c, hw


def _bn_threads(m):
    """Threads of a block-per-channel kernel: about 4 values each, 32 to BN_MAX_THREADS."""
    return min(BN_MAX_THREADS, max(32, 1 << max(0, math.ceil(m / 4) - 1).bit_length()))


def _param_or_dummy(a, xp, dtype):
    """A contiguous array for an optional (C,) parameter, and whether it is real."""
    return (xp.ascontiguousarray(a), 1) if a is not None else (xp.zeros(1, dtype), 0)


@register_kernel("cuda", "batch_norm")
def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, save_mean (C,), save_invstd (C,)); training updates the running stats in place."""
    t = ctype(x, weight, bias, running_mean, running_var)
    if t is None or x.ndim < 2 or x.shape[0] * x.shape[1] == 0:
        return None
    if (running_mean is None) != (running_var is None):
        return None
    has_running = running_mean is not None
    if has_running and not (running_mean.flags.c_contiguous and running_var.flags.c_contiguous):
        return None  # updated in place: the kernel needs their own memory
    n, c, hw = _bn_layout(x)
    if n * hw == 0 or not fits_int32(c, n * hw):
        return None
    xp = array_module(x)
    dt = x.dtype.type
    x = xp.ascontiguousarray(x)
    w, has_w = _param_or_dummy(weight, xp, x.dtype)
    b, has_b = _param_or_dummy(bias, xp, x.dtype)
    y = xp.empty_like(x)
    if not training:
        if not has_running:
            return None
        launch("batch_norm.cu", f"batch_norm_fwd_eval<{t}>", grid_1d(x.size, x), THREADS,
               (x, w, b, running_mean, running_var, y, np.int64(x.size), np.int32(c),
                np.int64(hw), dt(eps), np.int32(has_w), np.int32(has_b)))
        return y, running_mean.copy(), 1 / xp.sqrt(running_var + dt(eps))
    if momentum is None and has_running:
        return None  # cumulative averaging: the op computes the factor
    if has_running:
        rm, rv = running_mean, running_var
    else:  # not read: has_running = 0
        rm, rv = xp.zeros(1, x.dtype), xp.zeros(1, x.dtype)
    save_mean = xp.empty(c, x.dtype)
    save_invstd = xp.empty(c, x.dtype)
    flags = (np.int32(has_w), np.int32(has_b), np.int32(has_running))
    mom = dt(momentum if momentum is not None else 0.0)
    if hw == 1:
        grid = max(1, min(math.ceil(c / 32), wave_blocks(x, 256)))
        launch("batch_norm.cu", f"batch_norm_fwd_train_cols<{t}>", grid, (32, 8),
               (x, w, b, rm, rv, y, save_mean, save_invstd, np.int32(n), np.int32(c), mom,
                dt(eps)) + flags)
    else:
        threads = _bn_threads(n * hw)
        keep, smem = _bn_cache(n * hw, x.itemsize, 1)
        launch("batch_norm.cu", f"batch_norm_fwd_train_plane<{t}>",
               max(1, min(c, wave_blocks(x, threads))), threads,
               (x, w, b, rm, rv, y, save_mean, save_invstd, np.int32(n), np.int32(c),
                np.int64(hw), mom, dt(eps)) + flags + (np.int32(keep),), smem)
    return y, save_mean, save_invstd


@register_kernel("cuda", "batch_norm_backward")
def batch_norm_backward(gy, x, weight, save_mean, save_invstd):
    """(gx, gw (C,), gb (C,)) of a training-mode batch norm (batch statistics)."""
    t = ctype(gy, x, weight, save_mean, save_invstd)
    if t is None or x.ndim < 2 or gy.shape != x.shape or x.shape[0] * x.shape[1] == 0:
        return None
    n, c, hw = _bn_layout(x)
    if n * hw == 0 or not fits_int32(c, n * hw):
        return None
    xp = array_module(x)
    gy = xp.ascontiguousarray(gy)
    x = xp.ascontiguousarray(x)
    w, has_w = _param_or_dummy(weight, xp, x.dtype)
    mean = xp.ascontiguousarray(save_mean)
    invstd = xp.ascontiguousarray(save_invstd)
    gx = xp.empty_like(x)
    gw = xp.empty(c, x.dtype)
    gb = xp.empty(c, x.dtype)
    if hw == 1:
        grid = max(1, min(math.ceil(c / 32), wave_blocks(x, 256)))
        launch("batch_norm.cu", f"batch_norm_bwd_cols<{t}>", grid, (32, 8),
               (gy, x, w, mean, invstd, gx, gw, gb, np.int32(n), np.int32(c), np.int32(has_w)))
    else:
        threads = _bn_threads(n * hw)
        keep, smem = _bn_cache(n * hw, x.itemsize, 2)
        launch("batch_norm.cu", f"batch_norm_bwd_plane<{t}>",
               max(1, min(c, wave_blocks(x, threads))), threads,
               (gy, x, w, mean, invstd, gx, gw, gb, np.int32(n), np.int32(c), np.int64(hw),
                np.int32(has_w), np.int32(keep)), smem)
    return gx, gw, gb
