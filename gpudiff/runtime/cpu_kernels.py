"""The C++ CPU kernels (gpudiff._C, csrc/cpu/) in the kernel table, device type 'cpu'.

Signatures are the contract of gpudiff/runtime/kernels.py. Each wrapper takes the raw numpy
arrays an op hands it, returns None for what the C++ does not handle (dtypes other than
float32/float64, non-numpy arrays) so the op runs its reference code, makes its inputs
C-contiguous (a copy only when they are not) and calls _C, which releases the GIL and
splits its loops over the cores with OpenMP.

Without a built gpudiff._C this module registers nothing and every op uses its reference.
"""
import contextlib
import ctypes
import os
import sys

import numpy as np

from .. import _C  # (runtime/__init__.py imports this module only when the extension is built)
from ..geometry import pool_output_size
from .kernels import register_kernel

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _tune_malloc():
    """Keep freed activation-sized blocks in the heap instead of returning them to the OS.

    glibc serves large blocks with mmap and trims the heap top eagerly, so every training
    step re-faults (and the kernel zero-fills) megabytes of fresh pages for arrays of the same
    sizes as the last step's: about 1000 page faults and 2.4 ms of system time per 5 ms
    LeNet step, 7 ms per MNIST-net step. With the mmap threshold at its maximum (32 MB) and
    a 256 MB trim threshold the memory is reused. Process-wide, like the allocator choice
    PyTorch's CPU docs recommend (jemalloc/tcmalloc); GPUDIFF_MALLOC_TUNING=0 turns it off.
    """
    if os.environ.get("GPUDIFF_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                           256 << 20)
        return bool(ok)
    except (OSError, AttributeError):  # not glibc
        return False


MALLOC_TUNED = _C is not None and _tune_malloc()


def _cpu_kernel(name):
    """``@register_kernel('cpu', name)`` when gpudiff._C is built, else a no-op."""
    if _C is None:
        return lambda fn: fn
    return register_kernel("cpu", name)


def _floats(*arrays):
    """True when every array is a numpy float32/float64 array of one dtype."""
    d = getattr(arrays[0], "dtype", None)
    if d not in _FLOATS:
        return False
    for a in arrays:  # (a loop, not all(genexpr): this runs on every kernel call)
        if type(a) is not np.ndarray or (a.dtype is not d and a.dtype != d):
            return False
    return True


def _c(a, dtype=None):
    """``a`` as a C-contiguous array (of ``dtype``), copying only when needed. Unlike
    np.ascontiguousarray this keeps 0-d arrays 0-d."""
    if dtype is not None and a.dtype != dtype:
        return np.array(a, dtype=dtype, order="C")
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _as_4d(x):
    """(N, C, H, W) view of a 4-D or unbatched 3-D input, and whether it was 3-D."""
    if x.ndim == 3:
        return x[None], True
    return x, False


# ---- convolution unfolding -------------------------------------------------------------
@_cpu_kernel("im2col")
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    # x (N, C, H, W) -> cols (N, C*kh*kw, OH*OW)
    if not _floats(x) or x.ndim != 4:
        return None
    return _C.im2col(_c(x), kh, kw, sh, sw, ph, pw, dh, dw)


@_cpu_kernel("col2im")
def col2im(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    # cols (N, C*kh*kw, OH*OW) -> x (N, C, H, W), overlapping taps summed
    if not _floats(cols) or cols.ndim != 3:
        return None
    return _C.col2im(_c(cols), C, H, W, kh, kw, sh, sw, ph, pw, dh, dw)


# ---- pooling ---------------------------------------------------------------------------
@_cpu_kernel("max_pool2d")
def max_pool2d(x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    if not _floats(x) or x.ndim not in (3, 4):
        return None
    x4, unbatched = _as_4d(x)
    oh = pool_output_size(x4.shape[2], kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(x4.shape[3], kw, sw, pw, dw, ceil_mode)
    y, idx = _C.max_pool2d(_c(x4), kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
    return (y[0], idx[0]) if unbatched else (y, idx)


@_cpu_kernel("max_pool2d_backward")
def max_pool2d_backward(gy, indices, H, W):
    if not _floats(gy) or gy.ndim not in (3, 4) or indices.shape != gy.shape:
        return None
    gy4, unbatched = _as_4d(gy)
    idx4 = indices[None] if unbatched else indices
    gx = _C.max_pool2d_backward(_c(gy4), _c(idx4, dtype=np.int64), H, W)
    return gx[0] if unbatched else gx


@_cpu_kernel("avg_pool2d")
def avg_pool2d(x, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override):
    if not _floats(x) or x.ndim not in (3, 4):
        return None
    x4, unbatched = _as_4d(x)
    oh = pool_output_size(x4.shape[2], kh, sh, ph, 1, ceil_mode)
    ow = pool_output_size(x4.shape[3], kw, sw, pw, 1, ceil_mode)
    y = _C.avg_pool2d(_c(x4), kh, kw, sh, sw, ph, pw, oh, ow, bool(count_include_pad),
                      int(divisor_override or 0))
    return y[0] if unbatched else y


@_cpu_kernel("avg_pool2d_backward")
def avg_pool2d_backward(gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                        divisor_override):
    if not _floats(gy) or gy.ndim not in (3, 4):
        return None
    gy4, unbatched = _as_4d(gy)
    if gy4.shape[2:] != (pool_output_size(H, kh, sh, ph, 1, ceil_mode),
                         pool_output_size(W, kw, sw, pw, 1, ceil_mode)):
        raise ValueError("avg_pool2d_backward: gy's spatial size does not match the pooling "
                         "geometry")
    gx = _C.avg_pool2d_backward(_c(gy4), H, W, kh, kw, sh, sw, ph, pw, bool(count_include_pad),
                                int(divisor_override or 0))
    return gx[0] if unbatched else gx


@_cpu_kernel("adaptive_avg_pool2d")
def adaptive_avg_pool2d(x, oh, ow):
    if not _floats(x) or x.ndim not in (3, 4):
        return None
    x4, unbatched = _as_4d(x)
    y = _C.adaptive_avg_pool2d(_c(x4), int(oh), int(ow))
    return y[0] if unbatched else y


@_cpu_kernel("adaptive_avg_pool2d_backward")
def adaptive_avg_pool2d_backward(gy, H, W):
    if not _floats(gy) or gy.ndim not in (3, 4):
        return None
    gy4, unbatched = _as_4d(gy)
    gx = _C.adaptive_avg_pool2d_backward(_c(gy4), int(H), int(W))
    return gx[0] if unbatched else gx


@_cpu_kernel("adaptive_max_pool2d")
def adaptive_max_pool2d(x, oh, ow):
    if not _floats(x) or x.ndim not in (3, 4):
        return None
    x4, unbatched = _as_4d(x)
    y, idx = _C.adaptive_max_pool2d(_c(x4), int(oh), int(ow))
    return (y[0], idx[0]) if unbatched else (y, idx)


# ---- batch norm and dropout ------------------------------------------------------------
@_cpu_kernel("batch_norm")
def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    # y = (x - mean) * invstd * weight + bias per channel (dim 1), x (N, C, *)
    if not _floats(x, *(a for a in (weight, bias) if a is not None)) or x.ndim < 2:
        return None
    if any(a is not None and type(a) is not np.ndarray for a in (running_mean, running_var)):
        return None
    x = _c(x)
    if training:
        mean, var = _C.batch_norm_stats(x)
        n = x.size // x.shape[1]
        if running_mean is not None:  # in place, in the buffers' own dtype
            running_mean *= 1 - momentum
            running_mean += momentum * mean
        if running_var is not None:   # the unbiased variance, as PyTorch
            running_var *= 1 - momentum
            running_var += momentum * var * (n / max(n - 1, 1))
    else:
        mean = running_mean.astype(x.dtype)
        var = running_var.astype(x.dtype)
    invstd = (1 / np.sqrt(var + x.dtype.type(eps))).astype(x.dtype)
    scale = invstd * weight if weight is not None else invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    y = _C.channel_affine(x, _c(scale, dtype=x.dtype), _c(shift, dtype=x.dtype))
    return y, mean, invstd


@_cpu_kernel("batch_norm_backward")
def batch_norm_backward(gy, x, weight, save_mean, save_invstd):
    # training-mode gradients with M = N * H * W values per channel:
    #   gx = w * invstd * (gy - sum(gy)/M - xhat * sum(gy * xhat)/M),  xhat = (x - mean) * invstd
    #   gw = sum(gy * xhat),  gb = sum(gy)
    if not _floats(gy, x, save_mean, save_invstd) or gy.shape != x.shape or x.ndim < 2:
        return None
    gy, x = _c(gy), _c(x)
    sum_gy, sum_gy_xmu = _C.batch_norm_backward_reduce(gy, x, _c(save_mean))
    M = x.size // x.shape[1]
    w = np.ones_like(save_invstd) if weight is None else weight.astype(x.dtype, copy=False)
    a = w * save_invstd                                      # gx = a*gy + b*x + c
    b = -a * save_invstd * save_invstd * sum_gy_xmu / M
    c = -a * sum_gy / M - b * save_mean
    gx = _C.channel_affine2(gy, x, _c(a), _c(b), _c(c))
    return gx, sum_gy_xmu * save_invstd, sum_gy


@_cpu_kernel("dropout")
def dropout(x, p, seed, group):
    # y = x * keep(i // group) / (1 - p): the counter-based mask of csrc/cpu/norm.cpp
    if not _floats(x):
        return None
    return _C.dropout(_c(x), float(p), int(seed), int(group))


# ---- element-wise activations and their fused backwards --------------------------------
@_cpu_kernel("relu")
def relu(x):
    return _C.relu(_c(x)) if _floats(x) else None


@_cpu_kernel("relu_backward")
def relu_backward(y, gy):
    return _C.relu_backward(_c(y), _c(gy)) if _floats(y, gy) and y.shape == gy.shape else None


@_cpu_kernel("leaky_relu")
def leaky_relu(x, negative_slope):
    return _C.leaky_relu(_c(x), float(negative_slope)) if _floats(x) else None


@_cpu_kernel("leaky_relu_backward")
def leaky_relu_backward(x, gy, negative_slope):
    if not (_floats(x, gy) and x.shape == gy.shape):
        return None
    return _C.leaky_relu_backward(_c(x), _c(gy), float(negative_slope))


@_cpu_kernel("sigmoid")
def sigmoid(x):
    return _C.sigmoid(_c(x)) if _floats(x) else None


@_cpu_kernel("sigmoid_backward")
def sigmoid_backward(y, gy):
    if not (_floats(y, gy) and y.shape == gy.shape):
        return None
    return _C.sigmoid_backward(_c(y), _c(gy))


# no "tanh": NumPy's SIMD tanh is as fast as a C++ loop and exact to the ulp


@_cpu_kernel("tanh_backward")
def tanh_backward(y, gy):
    return _C.tanh_backward(_c(y), _c(gy)) if _floats(y, gy) and y.shape == gy.shape else None


# ---- softmax family --------------------------------------------------------------------
@_cpu_kernel("softmax")
def softmax(x, dim):
    return _C.softmax(_c(x), int(dim)) if _floats(x) else None


@_cpu_kernel("log_softmax")
def log_softmax(x, dim):
    return _C.log_softmax(_c(x), int(dim)) if _floats(x) else None


@_cpu_kernel("softmax_backward")
def softmax_backward(y, gy, dim):
    if not (_floats(y, gy) and y.shape == gy.shape):
        return None
    return _C.softmax_backward(_c(y), _c(gy), int(dim))


@_cpu_kernel("log_softmax_backward")
def log_softmax_backward(y, gy, dim):
    if not (_floats(y, gy) and y.shape == gy.shape):
        return None
    return _C.log_softmax_backward(_c(y), _c(gy), int(dim))


@_cpu_kernel("cross_entropy")
def cross_entropy(logits, target, weight, ignore_index, label_smoothing):
    # logits (N, C), target (N,) class indices -> (losses (N,), dlogits (N, C))
    if not _floats(logits) or logits.ndim != 2 or type(target) is not np.ndarray \
            or target.ndim != 1 or target.dtype.kind not in "iu":
        return None
    if weight is not None:
        if type(weight) is not np.ndarray:
            return None
        weight = _c(weight, dtype=logits.dtype)
    return _C.cross_entropy(_c(logits), _c(target, dtype=np.int64), weight, int(ignore_index),
                            float(label_smoothing))


# ---- optimizer ------------------------------------------------------------------------------
@_cpu_kernel("sgd_step")
def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
             maximize):
    # in place, one C++ pass per parameter; NotImplemented (the optimizer's own loop) for
    # what it does not take: other dtypes, non-contiguous or non-NumPy arrays
    arrays = list(params) + list(grads) + [b for b in momentum_buffers if b is not None]
    if not arrays or not _floats(*arrays) or not all(a.flags.c_contiguous for a in arrays):
        return NotImplemented
    _C.sgd_step(list(params), list(grads), list(momentum_buffers), float(lr), float(momentum),
                float(dampening), float(weight_decay), bool(nesterov), bool(maximize))
    return None


# ---- matrix product ------------------------------------------------------------------------
@_cpu_kernel("matmul")
def matmul(a, b):
    # a (M, K) @ b (K, N), views with transposed strides included, on our GEMM with the
    # threads over column blocks: NumPy's OpenBLAS would wake its own thread pool, whose
    # spinning workers then compete with ours for the same 2 cores. Other shapes: None.
    if not _floats(a, b) or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        return None
    if 0 in a.shape or 0 in b.shape:  # empty product: zeros (strides of empties vary)
        return np.zeros((a.shape[0], b.shape[1]), a.dtype)
    return _C.matmul(a, b)


# ---- whole-op convolution ---------------------------------------------------------------
# csrc/cpu/conv.cpp: per chunk of samples, im2col into a cache-sized per-thread buffer and
# one single-threaded GEMM of csrc/cpu/gemm.cpp (AVX-512 where the CPU has it), the chunks
# split over the cores; the output lands in NCHW. Stride, padding, dilation: (h, w) pairs.
# 3x3 stride-1 convolutions with enough channels take Winograd F(2x2, 3x3) (see below).
def _conv_ok(*arrays):
    return _floats(*(a for a in arrays if a is not None)) and arrays[0].ndim == 4 \
        and arrays[1].ndim == 4


def _conv_shape_ok(x_shape, w_shape, stride, padding, dilation, groups):
    (N, C, H, W), (K, Cg, kh, kw) = x_shape, w_shape
    OH = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    ok = groups >= 1 and C == Cg * groups and K % groups == 0 and OH >= 1 and OW >= 1
    return ok, (N, K, OH, OW)


@_cpu_kernel("conv2d")
def conv2d(x, w, b, stride, padding, dilation, groups):
    # y (N, K, OH, OW) = conv(x (N, C, H, W), w (K, C/G, kh, kw)) + b
    if not _conv_ok(x, w, b):
        return None
    ok, _ = _conv_shape_ok(x.shape, w.shape, stride, padding, dilation, groups)
    if not ok:
        return None
    return _C.conv2d_forward(_c(x), _c(w), None if b is None else _c(b), tuple(stride),
                             tuple(padding), tuple(dilation), int(groups))


@_cpu_kernel("conv2d_backward_input")
def conv2d_backward_input(gy, w, x_shape, stride, padding, dilation, groups):
    # gx (x_shape) = col2im( W^T @ gy ) per sample and group
    if not _conv_ok(gy, w) or len(x_shape) != 4:
        return None
    ok, y_shape = _conv_shape_ok(tuple(x_shape), w.shape, stride, padding, dilation, groups)
    if not ok or gy.shape != y_shape:
        return None
    return _C.conv2d_backward_input(_c(gy), _c(w), tuple(x_shape), tuple(stride), tuple(padding),
                                    tuple(dilation), int(groups))


@_cpu_kernel("conv2d_backward_weight")
def conv2d_backward_weight(gy, x, w_shape, stride, padding, dilation, groups):
    # gw (w_shape) = sum over samples of gy @ cols^T
    if not _conv_ok(gy, x) or len(w_shape) != 4:
        return None
    ok, y_shape = _conv_shape_ok(x.shape, tuple(w_shape), stride, padding, dilation, groups)
    if not ok or gy.shape != y_shape:
        return None
    return _C.conv2d_backward_weight(_c(gy), _c(x), tuple(w_shape), tuple(stride),
                                     tuple(padding), tuple(dilation), int(groups))


# ---- Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions (csrc/cpu/conv.cpp) ---------------
# conv2d, its input gradient (the flipped-kernel convolution) and its weight gradient take it
# where it measured faster than the exact paths (conv.cpp's wino_pays: 32+ channels on both
# sides, 16 by 16 in float32 on AVX-512, or 16+ on 8x8 images; all of ResNet-20's stride-1
# 3x3 convolutions). Modes: 0 never
# (the exact paths, bit for bit as before), 1 where it pays (the default), 2 wherever it
# fits (3x3, stride 1, dilation 1, one group, padding <= 2; the tests).
# GPUDIFF_CONV_WINOGRAD=0/1/2 sets the mode at import (benchmarks: before / after).
WINOGRAD_MODES = {"off": 0, "auto": 1, "always": 2}


def set_conv_winograd(mode):
    """Sets the Winograd mode (0 / 1 / 2 or 'off' / 'auto' / 'always'); returns the previous
    one (an int), or None without the extension."""
    if _C is None:
        return None
    return _C.set_conv_winograd(int(WINOGRAD_MODES.get(mode, mode)))


@contextlib.contextmanager
def conv_winograd(mode):
    """``with conv_winograd('always'):`` ... the previous mode again after the block."""
    prev = set_conv_winograd(mode)
    try:
        yield
    finally:
        if prev is not None:
            set_conv_winograd(prev)


def winograd_calls():
    """(forward, input gradient, weight gradient): the kernel calls that took Winograd so
    far in this process (process-wide counters, never reset)."""
    return tuple(_C.conv_winograd_calls()) if _C is not None else (0, 0, 0)


if _C is not None and os.environ.get("GPUDIFF_CONV_WINOGRAD", "") != "":
    set_conv_winograd(os.environ["GPUDIFF_CONV_WINOGRAD"])
