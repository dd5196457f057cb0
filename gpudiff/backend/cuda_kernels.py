"""The 'cuda' entries of the kernel table (contract: gpudiff/backend/kernels.py).

Each wrapper takes the raw arrays of a cuda tensor (CuPy on a GPU, NumPy on the emulated
device), picks the launch configuration and launches a kernel of csrc/cuda through
cuda_launch.launch, so the same code path runs on a GPU and in CI. A wrapper returns None
when it does not handle the dtype or layout; the op then uses its xp reference.

Layouts: elementwise kernels see flat contiguous arrays; row kernels (softmax family,
cross-entropy) see a contiguous (rows, cols) matrix reduced along cols, so ``dim`` is moved
last first (a copy when it is not last already). Rows of up to SMALL_ROW_MAX_COLS columns
take the ``*_small`` kernels (a thread per row on shared-memory tiles), longer ones a warp
or a block per row (row_config).
"""
import math

import numpy as np

from .cuda_launch import array_module, launch, sm_count
from .kernels import register_kernel

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

ELEMENTWISE_THREADS = 256
WARP_ROW_MAX_COLS = 256  # rows up to this long get a warp each, longer ones a block
ROWS_PER_BLOCK = 4       # warp-per-row blocks: (32, 4) threads
SMALL_ROW_MAX_COLS = 32  # rows up to this long: a thread per row on a shared-memory tile
SMALL_ROW_THREADS = {4: 128, 8: 64}  # rows per tile by itemsize: tiles of <= 34 KB shared
MAX_RESIDENT_THREADS_PER_SM = 2048  # H100 (sm_90) and A100 (sm_80)


def _ctype(*arrays):
    """'float' / 'double' when all arrays share that dtype, else None."""
    dt = arrays[0].dtype
    if any(a.dtype != dt for a in arrays):
        return None
    return _CTYPES.get(dt)


def _wave(a, threads_per_block):
    """Blocks that fit on the device at once: grids beyond this are grid-strided."""
    return sm_count(a) * max(1, MAX_RESIDENT_THREADS_PER_SM // threads_per_block)


def elementwise_config(n, itemsize, a):
    """(grid, block) for a flat loop over n elements, 16 bytes per thread per step."""
    per_block = ELEMENTWISE_THREADS * (16 // itemsize)
    grid = max(1, min(math.ceil(n / per_block), _wave(a, ELEMENTWISE_THREADS)))
    return grid, ELEMENTWISE_THREADS


def row_config(rows, cols, a):
    """(grid, block) for a row kernel: a warp per row for short rows, a block per row else.

    Block-per-row threads: the power of 2 covering about 4 columns each, 64 to 512.
    """
    if cols <= WARP_ROW_MAX_COLS:
        block = (32, ROWS_PER_BLOCK, 1)
        grid = math.ceil(rows / ROWS_PER_BLOCK)
    else:
        threads = min(512, max(64, 1 << (math.ceil(cols / 4) - 1).bit_length()))
        block = (threads, 1, 1)
        grid = rows
    return max(1, min(grid, _wave(a, block[0] * block[1]))), block


def small_row_config(rows, cols, itemsize, buffers, extra, a):
    """(grid, block, shared bytes) for a *_small row kernel (common.cuh: short rows).

    A block of R threads takes R rows at a time; its shared memory holds ``buffers`` tiles of
    R rows padded to an odd stride, plus ``extra`` elements.
    """
    threads = SMALL_ROW_THREADS[itemsize]
    shared = (buffers * threads * (cols | 1) + extra) * itemsize
    grid = max(1, min(math.ceil(rows / threads), _wave(a, threads)))
    return grid, (threads, 1, 1), shared


# ---- elementwise activations ----------------------------------------------------------------
def _unary(kernel, x, *scalars):
    t = _ctype(x)
    if t is None:
        return None
    xp = array_module(x)
    xc = xp.ascontiguousarray(x)
    y = xp.empty(x.shape, x.dtype)
    if x.size:
        grid, block = elementwise_config(x.size, x.itemsize, x)
        launch("activations.cu", f"{kernel}<{t}>", grid, block,
               (xc, y, np.int64(x.size), *(x.dtype.type(s) for s in scalars)))
    return y


def _binary(kernel, a, gy, *scalars):
    t = _ctype(a, gy)
    if t is None or a.shape != gy.shape:
        return None
    xp = array_module(a)
    ac, gc = xp.ascontiguousarray(a), xp.ascontiguousarray(gy)
    gx = xp.empty(a.shape, a.dtype)
    if a.size:
        grid, block = elementwise_config(a.size, a.itemsize, a)
        launch("activations.cu", f"{kernel}<{t}>", grid, block,
               (ac, gc, gx, np.int64(a.size), *(a.dtype.type(s) for s in scalars)))
    return gx


@register_kernel("cuda", "relu")
def relu(x):
    return _unary("relu_fwd", x)


@register_kernel("cuda", "relu_backward")
def relu_backward(y, gy):
    return _binary("relu_bwd", y, gy)


@register_kernel("cuda", "leaky_relu")
def leaky_relu(x, negative_slope):
    return _unary("leaky_relu_fwd", x, negative_slope)


@register_kernel("cuda", "leaky_relu_backward")
def leaky_relu_backward(x, gy, negative_slope):
    return _binary("leaky_relu_bwd", x, gy, negative_slope)


@register_kernel("cuda", "sigmoid")
def sigmoid(x):
    return _unary("sigmoid_fwd", x)


@register_kernel("cuda", "sigmoid_backward")
def sigmoid_backward(y, gy):
    return _binary("sigmoid_bwd", y, gy)


@register_kernel("cuda", "tanh")
def tanh(x):
    return _unary("tanh_fwd", x)


@register_kernel("cuda", "tanh_backward")
def tanh_backward(y, gy):
    return _binary("tanh_bwd", y, gy)


# ---- softmax family ---------------------------------------------------------------------------
def _rows_call(kernel, dim, *arrays):
    """Run a row kernel along ``dim`` of same-shaped arrays; the result has their shape."""
    x = arrays[0]
    t = _ctype(*arrays)
    if t is None or x.ndim == 0 or any(a.shape != x.shape for a in arrays):
        return None
    if not -x.ndim <= dim < x.ndim:
        return None  # the reference raises the proper error
    dim %= x.ndim
    xp = array_module(x)
    moved = [xp.ascontiguousarray(xp.moveaxis(a, dim, -1)) for a in arrays]  # (..., cols)
    shape = moved[0].shape
    cols = shape[-1]
    rows = x.size // cols if cols else 0
    out = xp.empty(shape, x.dtype)
    args = (*moved, out, np.int64(rows), np.int32(cols))
    if x.size and cols <= SMALL_ROW_MAX_COLS:  # a thread per row, tiles staged in shared memory
        grid, block, shared = small_row_config(rows, cols, x.itemsize, len(arrays), 0, x)
        launch("softmax.cu", f"{kernel}_small<{t}>", grid, block, args, shared)
    elif x.size:
        grid, block = row_config(rows, cols, x)
        launch("softmax.cu", f"{kernel}<{t}>", grid, block, args)
    return xp.moveaxis(out, -1, dim)


@register_kernel("cuda", "softmax")
def softmax(x, dim):
    return _rows_call("softmax_fwd", dim, x)


@register_kernel("cuda", "log_softmax")
def log_softmax(x, dim):
    return _rows_call("log_softmax_fwd", dim, x)


@register_kernel("cuda", "softmax_backward")
def softmax_backward(y, gy, dim):
    return _rows_call("softmax_bwd", dim, y, gy)


@register_kernel("cuda", "log_softmax_backward")
def log_softmax_backward(y, gy, dim):
    return _rows_call("log_softmax_bwd", dim, y, gy)


# ---- fused softmax cross-entropy ----------------------------------------------------------
@register_kernel("cuda", "cross_entropy")
def cross_entropy(logits, target, weight, ignore_index, label_smoothing):
    """(losses (N,), dlogits (N, C)) for logits (N, C) and int target (N,); see kernels.py."""
    t = _ctype(logits)
    if t is None or logits.ndim != 2 or target.shape != logits.shape[:1]:
        return None
    if target.dtype.kind not in "iu" or logits.shape[1] == 0:
        return None
    xp = array_module(logits)
    n, c = logits.shape
    dt = logits.dtype
    w = xp.ones(c, dt) if weight is None else xp.ascontiguousarray(weight, dtype=dt)
    if w.shape != (c,):
        return None
    losses = xp.empty((n,), dt)
    dlogits = xp.empty((n, c), dt)
    if n:
        args = (xp.ascontiguousarray(logits), xp.ascontiguousarray(target, dtype=np.int64), w,
                losses, dlogits, np.int64(n), np.int32(c), np.int64(ignore_index),
                dt.type(label_smoothing))
        if c <= SMALL_ROW_MAX_COLS:  # a thread per row; the tile, then the weights, in shared
            grid, block, shared = small_row_config(n, c, dt.itemsize, 1, c, logits)
            launch("cross_entropy.cu", f"cross_entropy_fwd_bwd_small<{t}>", grid, block, args,
                   shared)
        else:
            grid, block = row_config(n, c, logits)
            launch("cross_entropy.cu", f"cross_entropy_fwd_bwd<{t}>", grid, block, args)
    return losses, dlogits
