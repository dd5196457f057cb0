"""The C++ CPU kernels (gpudiff._C, csrc/cpu/) in the kernel table, device type 'cpu'.

Signatures are the contract of gpudiff/backend/kernels.py. Each wrapper takes the raw numpy
arrays an op hands it, returns None for what the C++ does not handle (dtypes other than
float32/float64, non-numpy arrays) so the op runs its reference code, makes its inputs
C-contiguous (a copy only when they are not) and calls _C, which releases the GIL and
splits its loops over the cores with OpenMP.

Without a built gpudiff._C this module registers nothing and every op uses its reference.
"""
import os
import threading

import numpy as np

from .kernels import register_kernel

try:
    from gpudiff import _C
except ImportError:  # not built: the NumPy reference path does everything
    _C = None

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _numpy_openblas_path():
    """The OpenBLAS library NumPy loaded (scipy-openblas wheels), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path) and ".so" in path:
                    return path
    except OSError:  # not Linux
        pass
    return None


#: True when the whole-op convolutions call NumPy's BLAS per sample from C++ (conv.cpp);
#: otherwise they run one NumPy GEMM per batch chunk.
HAVE_BLAS = False
if _C is not None:
    _blas_path = _numpy_openblas_path()
    HAVE_BLAS = bool(_blas_path) and _C.blas_init(_blas_path)


def _cpu_kernel(name):
    """``@register_kernel('cpu', name)`` when gpudiff._C is built, else a no-op."""
    if _C is None:
        return lambda fn: fn
    return register_kernel("cpu", name)


def _floats(*arrays):
    """True when every array is a numpy float32/float64 array of one dtype."""
    a0 = arrays[0]
    return all(type(a) is np.ndarray and a.dtype in _FLOATS and a.dtype == a0.dtype
               for a in arrays)


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
    y, idx = _C.max_pool2d(_c(x4), kh, kw, sh, sw, ph, pw, dh, dw, bool(ceil_mode))
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
    y = _C.avg_pool2d(_c(x4), kh, kw, sh, sw, ph, pw, bool(ceil_mode), bool(count_include_pad),
                      int(divisor_override or 0))
    return y[0] if unbatched else y


@_cpu_kernel("avg_pool2d_backward")
def avg_pool2d_backward(gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                        divisor_override):
    if not _floats(gy) or gy.ndim not in (3, 4):
        return None
    gy4, unbatched = _as_4d(gy)
    gx = _C.avg_pool2d_backward(_c(gy4), H, W, kh, kw, sh, sw, ph, pw, bool(ceil_mode),
                                bool(count_include_pad), int(divisor_override or 0))
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
@_cpu_kernel("batch_norm_forward")
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


@_cpu_kernel("tanh")
def tanh(x):
    return _C.tanh(_c(x)) if _floats(x) else None


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


# ---- whole-op convolution ---------------------------------------------------------------
# With HAVE_BLAS, csrc/cpu/conv.cpp does everything: per sample, im2col into an L2-sized
# per-thread buffer and a single-threaded GEMM, samples split over the cores.
#
# Otherwise (another BLAS under NumPy): im2col into a reused workspace + NumPy GEMMs.
# Layout ("channels first" for the GEMM): the columns of a whole batch are laid out
# (C*kh*kw, N*L), L = OH*OW, so that each pass is ONE large GEMM:
#   forward   Y (K, N*L)  = W (K, Rg) @ cols (Rg, N*L);  y = swap01(Y) + b   -> (N, K, L)
#   dgrad     gcols       = W^T (Rg, K) @ gy_t (K, N*L); gx = col2im(gcols)   (gy_t = swap01(gy))
#   wgrad     gW (K, Rg)  = gy_t (K, N*L) @ cols^T (N*L, Rg)
# (per group with groups > 1). NumPy's batched matmul would issue one BLAS call per sample,
# and each call wakes and joins OpenBLAS's threads: on 2 shared cores that sync costs more
# than the arithmetic of a (64 x 288) @ (288 x 576) product. The two layout swaps cost one
# streaming pass each (in C++, with the bias added on the way).
class _Workspace(threading.local):
    """Per-thread scratch buffers reused across calls, by slot name and dtype.

    A fresh 40 MB column buffer costs as much in page faults as its im2col (the kernel
    zero-fills every new page); a buffer kept from the previous step costs nothing. Buffers
    above MAX_BYTES are not kept."""

    MAX_BYTES = 256 << 20

    def __init__(self):
        self.bufs = {}

    def get(self, slot, n, dtype):
        """A 1-D array of n elements of dtype (contents undefined)."""
        dtype = np.dtype(dtype)
        key = (slot, dtype)
        b = self.bufs.get(key)
        if b is None or b.size < n:
            b = np.empty(n, dtype)
            if n * dtype.itemsize <= self.MAX_BYTES:
                self.bufs[key] = b
        return b[:n]

    def clear(self):
        self.bufs.clear()


workspace = _Workspace()

#: The batch is processed in chunks whose column buffer stays under this many bytes: the
#: columns are then written by im2col and read by the GEMM in the L3 cache, not DRAM
#: (9x the input for a 3x3 kernel). Fewer, larger chunks mean fewer thread joins.
CONV_CHUNK_BYTES = 8 << 20


class _Geom:
    """Convolution geometry of x (N, C, H, W) and w (K, C/G, kh, kw)."""

    __slots__ = ("N", "C", "H", "W", "K", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "G",
                 "OH", "OW", "L", "Rg", "Kg", "taps")

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = x_shape
        self.K, _, self.kh, self.kw = w_shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.G = groups
        self.OH = (self.H + 2 * self.ph - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.OW = (self.W + 2 * self.pw - self.dw * (self.kw - 1) - 1) // self.sw + 1
        self.L = self.OH * self.OW
        self.Rg = self.C // groups * self.kh * self.kw
        self.Kg = self.K // groups
        self.taps = (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)

    def valid(self):
        return (self.OH >= 1 and self.OW >= 1 and self.C % self.G == 0
                and self.K % self.G == 0 and self.N >= 1)

    def chunks(self, itemsize):
        """[n0, n1) sample ranges of near-equal size whose columns fit CONV_CHUNK_BYTES."""
        per_sample = self.G * self.Rg * self.L * itemsize
        count = min(self.N, max(1, -(-per_sample * self.N // CONV_CHUNK_BYTES)))
        bounds = [self.N * i // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))


def _conv_args_ok(*arrays):
    return _floats(*(a for a in arrays if a is not None)) and arrays[0].ndim == 4


def _gemm(a, b, out=None):
    """a (G, m, k) @ b (G, k, n) -> (G, m, n) as G plain 2-D BLAS calls (NumPy's batched
    matmul with ``out`` and transposed operands can fall back to a slow non-BLAS loop)."""
    if out is None:
        out = np.empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype)
    for i in range(a.shape[0]):
        np.matmul(a[i], b[i], out=out[i])
    return out


def _columns_kbl(x, g, n):
    """im2col of x (n, C, H, W) laid out (G, Rg, n*L) in the workspace."""
    cols = workspace.get("cols", g.G * g.Rg * n * g.L, x.dtype)
    _C.im2col_into(x, cols, *g.taps, True)
    return cols.reshape(g.G, g.Rg, n * g.L)


@_cpu_kernel("conv2d")
def conv2d(x, w, b, stride, padding, dilation, groups):
    # y (N, K, OH, OW) = swap01( W (G, Kg, Rg) @ cols (G, Rg, N*L) ) + b
    if not _conv_args_ok(x, w, b) or w.ndim != 4:
        return None
    g = _Geom(x.shape, w.shape, stride, padding, dilation, groups)
    if not g.valid():
        return None
    x = _c(x)
    b = None if b is None else _c(b)
    if HAVE_BLAS:
        return _C.conv2d_forward(x, _c(w), b, stride, padding, dilation, groups)
    wm = _c(w).reshape(g.G, g.Kg, g.Rg)
    y = np.empty((g.N, g.K, g.OH, g.OW), x.dtype)
    for n0, n1 in g.chunks(x.dtype.itemsize):
        n = n1 - n0
        Y = workspace.get("gemm", g.K * n * g.L, x.dtype).reshape(g.G, g.Kg, n * g.L)
        _gemm(wm, _columns_kbl(x[n0:n1], g, n), out=Y)
        # (K, n, L) -> y[n0:n1] (n, K, L), bias added on the way
        _C.swap01(Y.reshape(g.K, n, g.L), b, y[n0:n1].reshape(n, g.K, g.L))
    return y


def _gy_kbl(gy, g, n0, n1):
    """gy[n0:n1] (n, K, OH, OW) as (G, Kg, n*L), in the workspace."""
    n = n1 - n0
    out = workspace.get("gy", g.K * n * g.L, gy.dtype)
    _C.swap01(_c(gy[n0:n1]).reshape(n, g.K, g.L), None, out.reshape(g.K, n, g.L))
    return out.reshape(g.G, g.Kg, n * g.L)


@_cpu_kernel("conv2d_backward_input")
def conv2d_backward_input(gy, w, x_shape, stride, padding, dilation, groups):
    # gx = col2im( W^T (G, Rg, Kg) @ gy_t (G, Kg, N*L) )
    if not _conv_args_ok(gy, w) or w.ndim != 4 or len(x_shape) != 4:
        return None
    g = _Geom(tuple(x_shape), w.shape, stride, padding, dilation, groups)
    if not g.valid() or gy.shape != (g.N, g.K, g.OH, g.OW):
        return None
    if HAVE_BLAS:
        return _C.conv2d_backward_input(_c(gy), _c(w), tuple(x_shape), stride, padding, dilation,
                                        groups)
    wt = _c(w).reshape(g.G, g.Kg, g.Rg).transpose(0, 2, 1)
    gx = np.empty(tuple(x_shape), gy.dtype)
    for n0, n1 in g.chunks(gy.dtype.itemsize):
        n = n1 - n0
        gcols = workspace.get("cols", g.G * g.Rg * n * g.L, gy.dtype)
        _gemm(wt, _gy_kbl(gy, g, n0, n1), out=gcols.reshape(g.G, g.Rg, n * g.L))
        _C.col2im_into(gcols, gx[n0:n1], *g.taps, True)
    return gx


@_cpu_kernel("conv2d_backward_weight")
def conv2d_backward_weight(gy, x, w_shape, stride, padding, dilation, groups):
    # gW (G, Kg, Rg) = gy_t (G, Kg, N*L) @ cols^T (G, N*L, Rg)
    if not _conv_args_ok(gy, x) or x.ndim != 4 or len(w_shape) != 4:
        return None
    g = _Geom(x.shape, tuple(w_shape), stride, padding, dilation, groups)
    if not g.valid() or gy.shape != (g.N, g.K, g.OH, g.OW):
        return None
    x = _c(x)
    if HAVE_BLAS:
        return _C.conv2d_backward_weight(_c(gy), x, tuple(w_shape), stride, padding, dilation,
                                         groups)
    gw = None
    for n0, n1 in g.chunks(x.dtype.itemsize):
        cols = _columns_kbl(x[n0:n1], g, n1 - n0)
        part = _gemm(_gy_kbl(gy, g, n0, n1), cols.transpose(0, 2, 1))
        gw = part if gw is None else gw + part
    return gw.reshape(tuple(w_shape))
