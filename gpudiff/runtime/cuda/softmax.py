"""Row kernels of csrc/cuda/softmax.cu: softmax and log_softmax, forward and backward.

The kernels see a contiguous (rows, cols) matrix reduced along cols, so ``dim`` is moved last
first (a copy when it is not last already). Rows of up to SMALL_ROW_MAX_COLS columns take the
``*_small`` kernels (a thread per row on shared-memory tiles), longer ones a warp or a block
per row (launch.row_config).
"""
import numpy as np

from ..kernels import register_kernel
from .launch import SMALL_ROW_MAX_COLS, array_module, ctype, launch, row_config, small_row_config


def _rows_call(kernel, dim, *arrays):
    """Run a row kernel along ``dim`` of same-shaped arrays; the result has their shape."""
    x = arrays[0]
    t = ctype(*arrays)
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
