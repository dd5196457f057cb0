"""Pooling kernels of csrc/cuda/pool.cu: max, average, adaptive average and adaptive max,
forward and backward (the backward passes gather: no atomics). Output sizes come from
gpudiff.geometry, as everywhere.
"""
import math

import numpy as np

from ...geometry import pool_output_size
from ..kernels import register_kernel
from .launch import (
    THREADS,
    address,
    array_module,
    ctype,
    fits_int32,
    grid_1d,
    i32,
    launch,
    unbatch,
    wave_blocks,
)

ADAPTIVE_WARP_MIN_WINDOW = 16  # adaptive avg windows this big get a warp per output


def _pool_input(x):
    """(contiguous (N, C, H, W) array, unbatched flag, ctype) or None."""
    t = ctype(x)
    if t is None or x.ndim not in (3, 4):
        return None
    x, unbatched = unbatch(x)
    return array_module(x).ascontiguousarray(x), unbatched, t


def _pool_window_ok(kh, kw, sh, sw, ph, pw, dh, dw):
    # PyTorch's rules (the CPU kernel raises on the rest; returning None lets the op do so)
    return (min(kh, kw, sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0
            and ph <= ((kh - 1) * dh + 1) // 2 and pw <= ((kw - 1) * dw + 1) // 2)


@register_kernel("cuda", "max_pool2d")
def max_pool2d(x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    """(y, indices int64) of x (N, C, H, W); indices are flat h*W + w within each plane."""
    got = _pool_input(x)
    if got is None or not _pool_window_ok(kh, kw, sh, sw, ph, pw, dh, dw):
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1 or not fits_int32(h * w, oh * ow):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    idx = xp.empty((n, c, oh, ow), np.int64)
    if y.size:
        launch("pool.cu", f"max_pool2d_fwd<{t}>", grid_1d(y.size, x), THREADS,
               (x, y, idx, np.int64(n * c)) + i32(h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw))
    return (y[0], idx[0]) if unbatched else (y, idx)


def _max_pool_backward(gy, indices, H, W, mode, span_h=0, sh=1, ph=0, span_w=0, sw=1, pw=0):
    t = ctype(gy)
    if t is None or gy.ndim not in (3, 4) or indices.shape != gy.shape:
        return None
    gy, unbatched = unbatch(gy)
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    idx = xp.ascontiguousarray(indices.reshape(gy.shape), dtype=np.int64)
    n, c, oh, ow = gy.shape
    if not fits_int32(H * W, oh * ow):
        return None
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"max_pool2d_bwd<{t}>", grid_1d(gx.size, gy), THREADS,
               (gy, idx, gx, np.int64(n * c))
               + i32(H, W, oh, ow, mode, span_h, sh, ph, span_w, sw, pw))
    return gx[0] if unbatched else gx


@register_kernel("cuda", "max_pool2d_backward")
def max_pool2d_backward(gy, indices, H, W):
    """gx (N, C, H, W) from gy and the forward's indices, the window geometry unknown: every
    input element checks every output of its plane (O(H*W*OH*OW); the pool ops call
    max_pool2d_with_indices_backward / adaptive_max_pool2d_backward, which know it)."""
    return _max_pool_backward(gy, indices, H, W, 2)


@register_kernel("cuda", "max_pool2d_with_indices_backward")
def max_pool2d_with_indices_backward(gy, indices, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """gx of max_pool2d: each input element gathers only the windows that can cover it."""
    return _max_pool_backward(gy, indices, H, W, 0, (kh - 1) * dh, sh, ph, (kw - 1) * dw, sw, pw)


@register_kernel("cuda", "adaptive_max_pool2d_backward")
def adaptive_max_pool2d_backward(gy, indices, H, W):
    """gx of adaptive_max_pool2d (a gather over the adaptive windows covering each input)."""
    return _max_pool_backward(gy, indices, H, W, 1)


@register_kernel("cuda", "adaptive_max_pool2d")
def adaptive_max_pool2d(x, oh, ow):
    """(y, indices int64) of x (N, C, H, W) over adaptive windows."""
    got = _pool_input(x)
    if got is None or oh < 1 or ow < 1:
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    if h < 1 or w < 1 or not fits_int32(h * w, oh * ow, (oh + 1) * h, (ow + 1) * w):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    idx = xp.empty((n, c, oh, ow), np.int64)
    if y.size:
        launch("pool.cu", f"adaptive_max_pool2d_fwd<{t}>", grid_1d(y.size, x), THREADS,
               (x, y, idx, np.int64(n * c)) + i32(h, w, oh, ow))
    return (y[0], idx[0]) if unbatched else (y, idx)


@register_kernel("cuda", "avg_pool2d")
def avg_pool2d(x, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override):
    got = _pool_input(x)
    if got is None or not _pool_window_ok(kh, kw, sh, sw, ph, pw, 1, 1):
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, 1, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, 1, ceil_mode)
    if oh < 1 or ow < 1 or not fits_int32(h * w, oh * ow):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    divisor = (np.int64(divisor_override or 0),)
    if not y.size:
        return y[0] if unbatched else y
    if kw == 2 and sw == 2 and pw == 0 and w % 2 == 0 and address(x) % (2 * x.itemsize) == 0:
        # windows two wide and two apart: pair loads, two lanes per output (pool.cu)
        launch("pool.cu", f"avg_pool2d_fwd_pairs<{t}>", grid_1d(2 * y.size, x), THREADS,
               (x, y, np.int64(n * c)) + i32(h, w, oh, ow, kh, sh, ph, bool(count_include_pad))
               + divisor)
    else:
        launch("pool.cu", f"avg_pool2d_fwd<{t}>", grid_1d(y.size, x), THREADS,
               (x, y, np.int64(n * c)) + i32(h, w, oh, ow, kh, kw, sh, sw, ph, pw,
                                              bool(count_include_pad)) + divisor)
    return y[0] if unbatched else y


@register_kernel("cuda", "avg_pool2d_backward")
def avg_pool2d_backward(gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                        divisor_override):
    t = ctype(gy)
    if t is None or gy.ndim not in (3, 4) or not _pool_window_ok(kh, kw, sh, sw, ph, pw, 1, 1):
        return None
    gy, unbatched = unbatch(gy)
    n, c, oh, ow = gy.shape
    if (oh, ow) != (pool_output_size(H, kh, sh, ph, 1, ceil_mode),
                    pool_output_size(W, kw, sw, pw, 1, ceil_mode)) or not fits_int32(H * W, oh * ow):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"avg_pool2d_bwd<{t}>", grid_1d(gx.size, gy), THREADS,
               (gy, gx, np.int64(n * c)) + i32(H, W, oh, ow, kh, kw, sh, sw, ph, pw,
                                                bool(count_include_pad))
               + (np.int64(divisor_override or 0),))
    return gx[0] if unbatched else gx


@register_kernel("cuda", "adaptive_avg_pool2d")
def adaptive_avg_pool2d(x, oh, ow):
    got = _pool_input(x)
    if got is None or oh < 1 or ow < 1:
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    if h < 1 or w < 1 or not fits_int32(h * w, oh * ow, (oh + 1) * h, (ow + 1) * w):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    if y.size and (h // oh) * (w // ow) >= ADAPTIVE_WARP_MIN_WINDOW:
        # big windows (global pooling): a warp per output, coalesced over the window
        launch("pool.cu", f"adaptive_avg_pool2d_fwd_warp<{t}>",
               max(1, min(math.ceil(y.size / 8), wave_blocks(x, 256))), (32, 8),
               (x, y, np.int64(n * c)) + i32(h, w, oh, ow))
    elif y.size:
        launch("pool.cu", f"adaptive_avg_pool2d_fwd<{t}>", grid_1d(y.size, x), THREADS,
               (x, y, np.int64(n * c)) + i32(h, w, oh, ow))
    return y[0] if unbatched else y


@register_kernel("cuda", "adaptive_avg_pool2d_backward")
def adaptive_avg_pool2d_backward(gy, H, W):
    t = ctype(gy)
    if t is None or gy.ndim not in (3, 4):
        return None
    gy, unbatched = unbatch(gy)
    n, c, oh, ow = gy.shape
    if H < 1 or W < 1 or not fits_int32(H * W, oh * ow, (oh + 1) * H, (ow + 1) * W):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"adaptive_avg_pool2d_bwd<{t}>", grid_1d(gx.size, gy), THREADS,
               (gy, gx, np.int64(n * c)) + i32(H, W, oh, ow))
    return gx[0] if unbatched else gx
