"""The CNN entries of the 'cuda' kernel table: convolution, pooling, batch norm, optimizers.

Contract: gpudiff/backend/kernels.py. Each wrapper takes the raw arrays of cuda tensors
(CuPy on a GPU, NumPy on the emulated device), picks the algorithm and launch configuration,
and launches kernels of csrc/cuda/{conv,im2col,pool,batch_norm,optim}.cu through
cuda_launch.launch: the same code path runs on a GPU and, in CI, on the emulator. A wrapper
returns None for what it does not handle (dtypes other than float32/float64, mixed dtypes,
sizes past the kernels' int indexing); the op then runs its xp reference.

Convolution algorithms (``conv_algorithm``; docs/CUDA_KERNELS.md has the reasoning):

  'implicit_gemm'  conv.cu conv2d_{fwd,dgrad,wgrad}_igemm: the GEMM operands are gathered
                   on the fly into shared-memory tiles, nothing extra in global memory;
                   wgrad splits its reduction over blocks and sums the splits in a second
                   pass (bitwise reproducible).
  'im2col'         im2col.cu + xp.matmul (cuBLAS on a GPU) + col2im; the columns are
                   materialised, in batch chunks of at most IM2COL_WORKSPACE_BYTES.
  'direct'         conv.cu conv2d_*_direct: a thread per output / input element, a block per
                   weight element; the path for depthwise convolutions.
  'auto'           choose_conv_algorithm(): direct for depthwise, im2col for 1x1 stride-1
                   unpadded convolutions (the columns are the input itself: a pure GEMM) and
                   for large GEMMs (where cuBLAS's FLOP rate pays for the column traffic),
                   implicit GEMM for the rest.

``last_conv_algorithm`` and ``conv_algorithm_counts`` say which path ran (the benchmark and
profiler read them); ``use_conv_algorithm(name)`` forces one for a block of code.
"""
import collections
import contextlib
import math

import numpy as np

from .cuda_launch import array_module, launch, sm_count
from .kernels import register_kernel

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INT_MAX = 2**31 - 1

# ---- settings and bookkeeping ---------------------------------------------------------------
CONV_ALGORITHMS = ("auto", "implicit_gemm", "im2col", "direct")
conv_algorithm = "auto"
#: pass ('forward', 'backward_input', 'backward_weight') -> algorithm of the latest call
last_conv_algorithm = {}
#: (pass, algorithm) -> number of calls since import (or reset_conv_log())
conv_algorithm_counts = collections.Counter()

# Launch parameters (an H100 has 132 SMs, 2048 resident threads each).
THREADS = 256                  # elementwise / gather kernels, direct conv
MAX_RESIDENT_THREADS_PER_SM = 2048
WGRAD_BLOCKS_PER_SM = 4        # split the wgrad reduction until ~4 blocks per SM
WGRAD_MIN_CHUNK = 256          # ... but give every split at least this much of N*OH*OW
WGRAD_MAX_WORKSPACE = 1 << 26  # elements of split partials (256 MB of float32)
IM2COL_WORKSPACE_BYTES = 256 << 20
# auto: im2col + cuBLAS when the GEMM is at least this big (rows = Kg, depth = Cg*KH*KW):
# the column traffic (2 * depth * N*OH*OW elements) is then under 1/32 of the GEMM's
# FLOPs per byte, and cuBLAS's SGEMM rate beats our SIMT tiles (to be tuned on a GPU).
IM2COL_MIN_ROWS = 128
IM2COL_MIN_DEPTH = 1152

# Implicit-GEMM tile shapes (the template arguments BM, BN, BK, TM, TN listed in conv.cu)
TILE_L = (64, 64, 8, 4, 4)
TILE_S = (16, 64, 16, 1, 4)
SMALL_TILE_MAX_ROWS = 16


def reset_conv_log():
    last_conv_algorithm.clear()
    conv_algorithm_counts.clear()


@contextlib.contextmanager
def use_conv_algorithm(name):
    """``with use_conv_algorithm('im2col'): ...`` forces a convolution algorithm."""
    global conv_algorithm
    if name not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {CONV_ALGORITHMS}, got {name!r}")
    old, conv_algorithm = conv_algorithm, name
    try:
        yield
    finally:
        conv_algorithm = old


# ---- helpers --------------------------------------------------------------------------------
def _ctype(*arrays):
    """'float' / 'double' when all (non-None) arrays share that dtype, else None."""
    arrays = [a for a in arrays if a is not None]
    dt = arrays[0].dtype
    if any(a.dtype != dt for a in arrays):
        return None
    return _CTYPES.get(dt)


def _i32(*vals):
    return tuple(np.int32(v) for v in vals)


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _wave_blocks(a, threads):
    """Blocks resident on the device at once: grids past this are grid-strided."""
    return sm_count(a) * max(1, MAX_RESIDENT_THREADS_PER_SM // threads)


def _grid_1d(total, a, threads=THREADS):
    return max(1, min(math.ceil(total / threads), _wave_blocks(a, threads)))


class ConvGeom:
    """Everything a conv kernel needs: x (N, C, H, W), w (K, C/G, KH, KW), y (N, K, OH, OW)."""

    __slots__ = ("N", "C", "H", "W", "K", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW",
                 "DH", "DW", "G", "_cg")

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = (int(v) for v in x_shape)
        self.K, self._cg, self.KH, self.KW = (int(v) for v in w_shape)
        self.SH, self.SW = _pair(stride)
        self.PH, self.PW = _pair(padding)
        self.DH, self.DW = _pair(dilation)
        self.G = int(groups)
        self.OH = (self.H + 2 * self.PH - self.DH * (self.KH - 1) - 1) // self.SH + 1
        self.OW = (self.W + 2 * self.PW - self.DW * (self.KW - 1) - 1) // self.SW + 1

    @property
    def Cg(self):
        return self.C // self.G

    @property
    def Kg(self):
        return self.K // self.G

    def valid(self):
        """Whether the kernels handle it: positive sizes, int32 operand indices."""
        g = self
        if min(g.SH, g.SW, g.DH, g.DW, g.G, g.KH, g.KW) < 1 or min(g.PH, g.PW) < 0:
            return False
        if g._cg * g.G != g.C:  # weight's in-channels times groups must be C
            return False
        if g.OH < 1 or g.OW < 1 or g.K % g.G:
            return False
        return max(g.N * g.OH * g.OW, g.N * g.H * g.W, g.Cg * g.KH * g.KW,
                   g.Kg * g.KH * g.KW, g.K * g.Cg * g.KH * g.KW) <= _INT_MAX

    def args(self):
        """The 16 int32 scalars N, C, H, W, K, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G."""
        return _i32(self.N, self.C, self.H, self.W, self.K, self.OH, self.OW, self.KH,
                    self.KW, self.SH, self.SW, self.PH, self.PW, self.DH, self.DW, self.G)

    def depthwise(self):
        return self.Cg == 1 and self.Kg <= 4

    def pointwise(self):
        """1x1, stride 1, no padding: the im2col columns are x itself."""
        return (self.KH, self.KW, self.SH, self.SW, self.PH, self.PW) == (1, 1, 1, 1, 0, 0)

    def flops(self):
        """Multiply-adds x 2 of one pass (forward, dgrad and wgrad are equal)."""
        return 2 * self.N * self.K * self.OH * self.OW * self.Cg * self.KH * self.KW


def choose_conv_algorithm(geom, pass_="forward"):
    """What 'auto' runs for ``geom`` (a ConvGeom), ``pass_`` one of forward,
    backward_input, backward_weight. See the module docstring."""
    if geom.depthwise():
        return "direct"
    if geom.pointwise():
        return "im2col"
    if geom.Kg >= IM2COL_MIN_ROWS and geom.Cg * geom.KH * geom.KW >= IM2COL_MIN_DEPTH:
        return "im2col"
    return "implicit_gemm"


def _algorithm(geom, pass_):
    algo = conv_algorithm
    if algo not in CONV_ALGORITHMS:
        raise ValueError(f"gpudiff.backend.cuda_cnn.conv_algorithm must be one of "
                         f"{CONV_ALGORITHMS}, got {algo!r}")
    if algo == "auto":
        algo = choose_conv_algorithm(geom, pass_)
    last_conv_algorithm[pass_] = algo
    conv_algorithm_counts[(pass_, algo)] += 1
    return algo


def _tile(rows):
    return TILE_S if rows <= SMALL_TILE_MAX_ROWS else TILE_L


def _igemm_name(kernel, t, tile):
    return f"{kernel}<{t}, {', '.join(str(v) for v in tile)}>"


def _igemm_grid(cols, rows, z, tile):
    bm, bn = tile[0], tile[1]
    return (math.ceil(cols / bn), math.ceil(rows / bm), z)


def _igemm_threads(tile):
    bm, bn, _, tm, tn = tile
    return (bm // tm) * (bn // tn)


def _batch_chunk(geom, itemsize, depth_per_image):
    """Images per im2col chunk so that the columns stay under IM2COL_WORKSPACE_BYTES."""
    per_image = depth_per_image * geom.OH * geom.OW * itemsize
    return max(1, min(geom.N, IM2COL_WORKSPACE_BYTES // max(1, per_image)))


def _run_im2col(x, geom, t):
    """cols (n, C*KH*KW, OH*OW) of a contiguous x (n, C, H, W)."""
    xp = array_module(x)
    n = x.shape[0]
    if geom.pointwise():
        return x.reshape(n, geom.C, geom.H * geom.W)  # the columns are x itself
    cols = xp.empty((n, geom.C * geom.KH * geom.KW, geom.OH * geom.OW), x.dtype)
    g = geom
    launch("im2col.cu", f"im2col_kernel<{t}>", _grid_1d(cols.size, x), THREADS,
           (x, cols) + _i32(n, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW,
                            g.DH, g.DW))
    return cols


def _run_col2im(cols, geom, t):
    """x (n, C, H, W) from contiguous cols (n, C*KH*KW, OH*OW), overlapping taps summed."""
    xp = array_module(cols)
    n = cols.shape[0]
    g = geom
    if g.pointwise():
        return cols.reshape(n, g.C, g.H, g.W)
    x = xp.empty((n, g.C, g.H, g.W), cols.dtype)
    launch("im2col.cu", f"col2im_kernel<{t}>", _grid_1d(x.size, cols), THREADS,
           (cols, x) + _i32(n, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW,
                            g.DH, g.DW))
    return x


def _unbatch(a):
    return (a[None], True) if a.ndim == 3 else (a, False)


# ---- convolution: forward -------------------------------------------------------------------
@register_kernel("cuda", "conv2d")
def conv2d(x, w, b, stride, padding, dilation, groups):
    """y (N, K, OH, OW) = conv2d(x (N, C, H, W), w (K, C/groups, KH, KW)) + b (K,)."""
    t = _ctype(x, w, b)
    if t is None or x.ndim not in (3, 4) or w.ndim != 4:
        return None
    x, unbatched = _unbatch(x)
    geom = ConvGeom(x.shape, w.shape, stride, padding, dilation, groups)
    if not geom.valid():
        return None
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    w = xp.ascontiguousarray(w)
    y = xp.empty((geom.N, geom.K, geom.OH, geom.OW), x.dtype)
    if y.size:
        algo = _algorithm(geom, "forward")
        if algo == "im2col":
            _conv2d_im2col(x, w, b, y, geom, t)
        else:
            has_bias = b is not None
            bias = xp.ascontiguousarray(b) if has_bias else xp.zeros(1, x.dtype)
            if algo == "direct":
                launch("conv.cu", f"conv2d_fwd_direct<{t}>", _grid_1d(y.size, x), THREADS,
                       (x, w, bias, y) + geom.args() + _i32(has_bias))
            else:
                tile = _tile(geom.Kg)
                launch("conv.cu", _igemm_name("conv2d_fwd_igemm", t, tile),
                       _igemm_grid(geom.N * geom.OH * geom.OW, geom.Kg, geom.G, tile),
                       _igemm_threads(tile), (x, w, bias, y) + geom.args() + _i32(has_bias))
    return y[0] if unbatched else y


def _conv2d_im2col(x, w, b, y, geom, t):
    xp = array_module(x)
    g = geom
    rg = g.Cg * g.KH * g.KW
    wm = w.reshape(g.G, g.Kg, rg)
    step = _batch_chunk(g, x.itemsize, g.C * g.KH * g.KW)
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        cols = _run_im2col(x[n0:n1], g, t).reshape(n1 - n0, g.G, rg, g.OH * g.OW)
        # (G, Kg, Rg) @ (n, G, Rg, OHW) -> (n, G, Kg, OHW)
        y[n0:n1] = xp.matmul(wm, cols).reshape(n1 - n0, g.K, g.OH, g.OW)
    if b is not None:
        y += b.reshape(1, g.K, 1, 1)


# ---- convolution: input gradient ------------------------------------------------------------
@register_kernel("cuda", "conv2d_backward_input")
def conv2d_backward_input(gy, w, x_shape, stride, padding, dilation, groups):
    """gx (N, C, H, W) of y = conv2d(x, w): also conv_transpose2d's forward."""
    t = _ctype(gy, w)
    if t is None or gy.ndim not in (3, 4) or w.ndim != 4 or len(x_shape) != gy.ndim:
        return None
    gy, unbatched = _unbatch(gy)
    x_shape = (1,) + tuple(x_shape) if unbatched else tuple(x_shape)
    geom = ConvGeom(x_shape, w.shape, stride, padding, dilation, groups)
    if not geom.valid() or gy.shape != (geom.N, geom.K, geom.OH, geom.OW):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    w = xp.ascontiguousarray(w)
    gx = xp.empty((geom.N, geom.C, geom.H, geom.W), gy.dtype)
    if gx.size:
        if gy.size == 0:
            gx[...] = 0
        else:
            algo = _algorithm(geom, "backward_input")
            if algo == "im2col":
                _dgrad_im2col(gy, w, gx, geom, t)
            elif algo == "direct":
                launch("conv.cu", f"conv2d_dgrad_direct<{t}>", _grid_1d(gx.size, gy), THREADS,
                       (gy, w, gx) + geom.args())
            else:
                tile = _tile(geom.Cg)
                launch("conv.cu", _igemm_name("conv2d_dgrad_igemm", t, tile),
                       _igemm_grid(geom.N * geom.H * geom.W, geom.Cg, geom.G, tile),
                       _igemm_threads(tile), (gy, _dgrad_weights(w, geom), gx) + geom.args())
    return gx[0] if unbatched else gx


def _dgrad_weights(w, geom):
    """wt (G, Cg, Kg, KH, KW): w (K, Cg, KH, KW) = (G, Kg, Cg, KH, KW) with (Kg, Cg) swapped,
    so that dgrad's A tiles (rows c, depth (k, i, j)) load contiguously. A copy of the
    weights only: small next to the activations."""
    g = geom
    xp = array_module(w)
    return xp.ascontiguousarray(
        w.reshape(g.G, g.Kg, g.Cg, g.KH, g.KW).transpose(0, 2, 1, 3, 4))


def _dgrad_im2col(gy, w, gx, geom, t):
    xp = array_module(gy)
    g = geom
    rg = g.Cg * g.KH * g.KW
    wt = w.reshape(g.G, g.Kg, rg).transpose(0, 2, 1)  # (G, Rg, Kg)
    step = _batch_chunk(g, gy.itemsize, g.C * g.KH * g.KW)
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        gyc = gy[n0:n1].reshape(n1 - n0, g.G, g.Kg, g.OH * g.OW)
        cols = xp.matmul(wt, gyc)  # (n, G, Rg, OHW), contiguous
        gx[n0:n1] = _run_col2im(cols.reshape(n1 - n0, g.C * g.KH * g.KW, g.OH * g.OW), g, t)


# ---- convolution: weight gradient -----------------------------------------------------------
@register_kernel("cuda", "conv2d_backward_weight")
def conv2d_backward_weight(gy, x, w_shape, stride, padding, dilation, groups):
    """gw (K, C/groups, KH, KW) of y = conv2d(x, w)."""
    t = _ctype(gy, x)
    if t is None or gy.ndim not in (3, 4) or x.ndim != gy.ndim or len(w_shape) != 4:
        return None
    gy, _ = _unbatch(gy)
    x, _ = _unbatch(x)
    geom = ConvGeom(x.shape, w_shape, stride, padding, dilation, groups)
    if not geom.valid() or gy.shape != (geom.N, geom.K, geom.OH, geom.OW):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    x = xp.ascontiguousarray(x)
    gw = xp.empty(tuple(int(v) for v in w_shape), gy.dtype)
    if gw.size == 0:
        return gw
    if gy.size == 0:
        gw[...] = 0
        return gw
    algo = _algorithm(geom, "backward_weight")
    if algo == "im2col":
        _wgrad_im2col(gy, x, gw, geom, t)
    elif algo == "direct":
        threads = min(THREADS, max(32, 1 << (geom.N * geom.OH * geom.OW - 1).bit_length()))
        launch("conv.cu", f"conv2d_wgrad_direct<{t}>",
               max(1, min(gw.size, _wave_blocks(gy, threads))), threads,
               (gy, x, gw) + geom.args())
    else:
        _wgrad_igemm(gy, x, gw, geom, t)
    return gw


def wgrad_splits(geom, some_array):
    """(splits, chunk): the split of the N*OH*OW reduction over blocks for implicit wgrad."""
    g = geom
    tile = _tile(g.Kg)
    rg = g.Cg * g.KH * g.KW
    p = g.N * g.OH * g.OW
    bk = tile[2]
    tiles = math.ceil(rg / tile[1]) * math.ceil(g.Kg / tile[0]) * g.G
    want = math.ceil(WGRAD_BLOCKS_PER_SM * sm_count(some_array) / tiles)
    splits = max(1, min(want, p // WGRAD_MIN_CHUNK, WGRAD_MAX_WORKSPACE // (g.K * rg),
                        65535 // g.G))
    chunk = math.ceil(math.ceil(p / splits) / bk) * bk  # whole BK steps per split
    return math.ceil(p / chunk), chunk


def _wgrad_igemm(gy, x, gw, geom, t):
    xp = array_module(gy)
    g = geom
    tile = _tile(g.Kg)
    rg = g.Cg * g.KH * g.KW
    splits, chunk = wgrad_splits(g, gy)
    ws = gw if splits == 1 else xp.empty((splits,) + gw.shape, gw.dtype)
    launch("conv.cu", _igemm_name("conv2d_wgrad_igemm", t, tile),
           _igemm_grid(rg, g.Kg, g.G * splits, tile), _igemm_threads(tile),
           (gy, x, ws) + g.args() + _i32(chunk))
    if splits > 1:
        launch("conv.cu", f"conv2d_wgrad_reduce<{t}>", _grid_1d(gw.size, gy), THREADS,
               (ws, gw, np.int64(gw.size), np.int32(splits)))


def _wgrad_im2col(gy, x, gw, geom, t):
    xp = array_module(gy)
    g = geom
    rg = g.Cg * g.KH * g.KW
    step = _batch_chunk(g, x.itemsize, g.C * g.KH * g.KW)
    acc = None
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        cols = _run_im2col(x[n0:n1], g, t).reshape(n1 - n0, g.G, rg, g.OH * g.OW)
        gyc = gy[n0:n1].reshape(n1 - n0, g.G, g.Kg, g.OH * g.OW)
        # (n, G, Kg, OHW) @ (n, G, OHW, Rg) -> (n, G, Kg, Rg), summed over the images
        part = xp.matmul(gyc, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        acc = part if acc is None else acc + part
    gw[...] = acc.reshape(gw.shape)


# ---- im2col / col2im (the contract's unfolding kernels) -------------------------------------
@register_kernel("cuda", "im2col")
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """cols (N, C*kh*kw, OH*OW) of x (N, C, H, W)."""
    t = _ctype(x)
    if t is None or x.ndim != 4:
        return None
    n, c = x.shape[:2]
    geom = ConvGeom(x.shape, (1, c, kh, kw), (sh, sw), (ph, pw), (dh, dw), 1)
    if not geom.valid():
        return None
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    cols = xp.empty((n, c * kh * kw, geom.OH * geom.OW), x.dtype)
    if cols.size:
        g = geom
        launch("im2col.cu", f"im2col_kernel<{t}>", _grid_1d(cols.size, x), THREADS,
               (x, cols) + _i32(n, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.PH,
                                g.PW, g.DH, g.DW))
    return cols


@register_kernel("cuda", "col2im")
def col2im(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) from cols (N, C*kh*kw, OH*OW), overlapping taps summed (a gather)."""
    t = _ctype(cols)
    if t is None or cols.ndim != 3:
        return None
    n = cols.shape[0]
    geom = ConvGeom((n, C, H, W), (1, C, kh, kw), (sh, sw), (ph, pw), (dh, dw), 1)
    if not geom.valid() or cols.shape[1:] != (C * kh * kw, geom.OH * geom.OW):
        return None
    xp = array_module(cols)
    cols = xp.ascontiguousarray(cols)
    x = xp.empty((n, C, H, W), cols.dtype)
    if x.size:
        g = geom
        launch("im2col.cu", f"col2im_kernel<{t}>", _grid_1d(x.size, cols), THREADS,
               (cols, x) + _i32(n, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH, g.SW, g.PH,
                                g.PW, g.DH, g.DW))
    return x


# ---- pooling --------------------------------------------------------------------------------
ADAPTIVE_WARP_MIN_WINDOW = 16  # adaptive avg windows this big get a warp per output
def pooling_output_size(n, k, s, p, d, ceil_mode):
    """PyTorch's pooling output size (csrc/cpu/common.h pooling_output_size)."""
    span = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _pool_input(x):
    """(contiguous (N, C, H, W) array, unbatched flag, ctype) or None."""
    t = _ctype(x)
    if t is None or x.ndim not in (3, 4):
        return None
    x, unbatched = _unbatch(x)
    return array_module(x).ascontiguousarray(x), unbatched, t


def _pool_window_ok(kh, kw, sh, sw, ph, pw, dh, dw):
    # PyTorch's rules (the CPU kernel raises on the rest; returning None lets the op do so)
    return (min(kh, kw, sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0
            and ph <= ((kh - 1) * dh + 1) // 2 and pw <= ((kw - 1) * dw + 1) // 2)


def _fits(*sizes):
    return max(sizes) <= _INT_MAX


@register_kernel("cuda", "max_pool2d")
def max_pool2d(x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    """(y, indices int64) of x (N, C, H, W); indices are flat h*W + w within each plane."""
    got = _pool_input(x)
    if got is None or not _pool_window_ok(kh, kw, sh, sw, ph, pw, dh, dw):
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    oh = pooling_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pooling_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1 or not _fits(h * w, oh * ow):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    idx = xp.empty((n, c, oh, ow), np.int64)
    if y.size:
        launch("pool.cu", f"max_pool2d_fwd<{t}>", _grid_1d(y.size, x), THREADS,
               (x, y, idx, np.int64(n * c)) + _i32(h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw))
    return (y[0], idx[0]) if unbatched else (y, idx)


def _max_pool_backward(gy, indices, H, W, mode, span_h=0, sh=1, ph=0, span_w=0, sw=1, pw=0):
    t = _ctype(gy)
    if t is None or gy.ndim not in (3, 4) or indices.shape != gy.shape:
        return None
    gy, unbatched = _unbatch(gy)
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    idx = xp.ascontiguousarray(indices.reshape(gy.shape), dtype=np.int64)
    n, c, oh, ow = gy.shape
    if not _fits(H * W, oh * ow):
        return None
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"max_pool2d_bwd<{t}>", _grid_1d(gx.size, gy), THREADS,
               (gy, idx, gx, np.int64(n * c))
               + _i32(H, W, oh, ow, mode, span_h, sh, ph, span_w, sw, pw))
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
    if h < 1 or w < 1 or not _fits(h * w, oh * ow, (oh + 1) * h, (ow + 1) * w):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    idx = xp.empty((n, c, oh, ow), np.int64)
    if y.size:
        launch("pool.cu", f"adaptive_max_pool2d_fwd<{t}>", _grid_1d(y.size, x), THREADS,
               (x, y, idx, np.int64(n * c)) + _i32(h, w, oh, ow))
    return (y[0], idx[0]) if unbatched else (y, idx)


@register_kernel("cuda", "avg_pool2d")
def avg_pool2d(x, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override):
    got = _pool_input(x)
    if got is None or not _pool_window_ok(kh, kw, sh, sw, ph, pw, 1, 1):
        return None
    x, unbatched, t = got
    n, c, h, w = x.shape
    oh = pooling_output_size(h, kh, sh, ph, 1, ceil_mode)
    ow = pooling_output_size(w, kw, sw, pw, 1, ceil_mode)
    if oh < 1 or ow < 1 or not _fits(h * w, oh * ow):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    divisor = (np.int64(divisor_override or 0),)
    if not y.size:
        return y[0] if unbatched else y
    if kw == 2 and sw == 2 and pw == 0 and w % 2 == 0 and _address(x) % (2 * x.itemsize) == 0:
        # windows two wide and two apart: pair loads, two lanes per output (pool.cu)
        launch("pool.cu", f"avg_pool2d_fwd_pairs<{t}>", _grid_1d(2 * y.size, x), THREADS,
               (x, y, np.int64(n * c)) + _i32(h, w, oh, ow, kh, sh, ph, bool(count_include_pad))
               + divisor)
    else:
        launch("pool.cu", f"avg_pool2d_fwd<{t}>", _grid_1d(y.size, x), THREADS,
               (x, y, np.int64(n * c)) + _i32(h, w, oh, ow, kh, kw, sh, sw, ph, pw,
                                              bool(count_include_pad)) + divisor)
    return y[0] if unbatched else y


@register_kernel("cuda", "avg_pool2d_backward")
def avg_pool2d_backward(gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                        divisor_override):
    t = _ctype(gy)
    if t is None or gy.ndim not in (3, 4) or not _pool_window_ok(kh, kw, sh, sw, ph, pw, 1, 1):
        return None
    gy, unbatched = _unbatch(gy)
    n, c, oh, ow = gy.shape
    if (oh, ow) != (pooling_output_size(H, kh, sh, ph, 1, ceil_mode),
                    pooling_output_size(W, kw, sw, pw, 1, ceil_mode)) or not _fits(H * W, oh * ow):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"avg_pool2d_bwd<{t}>", _grid_1d(gx.size, gy), THREADS,
               (gy, gx, np.int64(n * c)) + _i32(H, W, oh, ow, kh, kw, sh, sw, ph, pw,
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
    if h < 1 or w < 1 or not _fits(h * w, oh * ow, (oh + 1) * h, (ow + 1) * w):
        return None
    xp = array_module(x)
    y = xp.empty((n, c, oh, ow), x.dtype)
    if y.size and (h // oh) * (w // ow) >= ADAPTIVE_WARP_MIN_WINDOW:
        # big windows (global pooling): a warp per output, coalesced over the window
        launch("pool.cu", f"adaptive_avg_pool2d_fwd_warp<{t}>",
               max(1, min(math.ceil(y.size / 8), _wave_blocks(x, 256))), (32, 8),
               (x, y, np.int64(n * c)) + _i32(h, w, oh, ow))
    elif y.size:
        launch("pool.cu", f"adaptive_avg_pool2d_fwd<{t}>", _grid_1d(y.size, x), THREADS,
               (x, y, np.int64(n * c)) + _i32(h, w, oh, ow))
    return y[0] if unbatched else y


@register_kernel("cuda", "adaptive_avg_pool2d_backward")
def adaptive_avg_pool2d_backward(gy, H, W):
    t = _ctype(gy)
    if t is None or gy.ndim not in (3, 4):
        return None
    gy, unbatched = _unbatch(gy)
    n, c, oh, ow = gy.shape
    if H < 1 or W < 1 or not _fits(H * W, oh * ow, (oh + 1) * H, (ow + 1) * W):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    gx = xp.empty((n, c, int(H), int(W)), gy.dtype)
    if gx.size:
        launch("pool.cu", f"adaptive_avg_pool2d_bwd<{t}>", _grid_1d(gx.size, gy), THREADS,
               (gy, gx, np.int64(n * c)) + _i32(H, W, oh, ow))
    return gx[0] if unbatched else gx


# ---- batch norm -----------------------------------------------------------------------------
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


@register_kernel("cuda", "batch_norm_forward")
def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, save_mean (C,), save_invstd (C,)); training updates the running stats in place."""
    t = _ctype(x, weight, bias, running_mean, running_var)
    if t is None or x.ndim < 2 or x.shape[0] * x.shape[1] == 0:
        return None
    if (running_mean is None) != (running_var is None):
        return None
    has_running = running_mean is not None
    if has_running and not (running_mean.flags.c_contiguous and running_var.flags.c_contiguous):
        return None  # updated in place: the kernel needs their own memory
    n, c, hw = _bn_layout(x)
    if n * hw == 0 or not _fits(c, n * hw):
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
        launch("batch_norm.cu", f"batch_norm_fwd_eval<{t}>", _grid_1d(x.size, x), THREADS,
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
        grid = max(1, min(math.ceil(c / 32), _wave_blocks(x, 256)))
        launch("batch_norm.cu", f"batch_norm_fwd_train_cols<{t}>", grid, (32, 8),
               (x, w, b, rm, rv, y, save_mean, save_invstd, np.int32(n), np.int32(c), mom,
                dt(eps)) + flags)
    else:
        threads = _bn_threads(n * hw)
        keep, smem = _bn_cache(n * hw, x.itemsize, 1)
        launch("batch_norm.cu", f"batch_norm_fwd_train_plane<{t}>",
               max(1, min(c, _wave_blocks(x, threads))), threads,
               (x, w, b, rm, rv, y, save_mean, save_invstd, np.int32(n), np.int32(c),
                np.int64(hw), mom, dt(eps)) + flags + (np.int32(keep),), smem)
    return y, save_mean, save_invstd


@register_kernel("cuda", "batch_norm_backward")
def batch_norm_backward(gy, x, weight, save_mean, save_invstd):
    """(gx, gw (C,), gb (C,)) of a training-mode batch norm (batch statistics)."""
    t = _ctype(gy, x, weight, save_mean, save_invstd)
    if t is None or x.ndim < 2 or gy.shape != x.shape or x.shape[0] * x.shape[1] == 0:
        return None
    n, c, hw = _bn_layout(x)
    if n * hw == 0 or not _fits(c, n * hw):
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
        grid = max(1, min(math.ceil(c / 32), _wave_blocks(x, 256)))
        launch("batch_norm.cu", f"batch_norm_bwd_cols<{t}>", grid, (32, 8),
               (gy, x, w, mean, invstd, gx, gw, gb, np.int32(n), np.int32(c), np.int32(has_w)))
    else:
        threads = _bn_threads(n * hw)
        keep, smem = _bn_cache(n * hw, x.itemsize, 2)
        launch("batch_norm.cu", f"batch_norm_bwd_plane<{t}>",
               max(1, min(c, _wave_blocks(x, threads))), threads,
               (gy, x, w, mean, invstd, gx, gw, gb, np.int32(n), np.int32(c), np.int64(hw),
                np.int32(has_w), np.int32(keep)), smem)
    return gx, gw, gb


# ---- fused multi-tensor optimizer steps -------------------------------------------------------
OPTIM_CHUNK = 2048   # elements per block: csrc/cuda/optim.cu opt::CHUNK
OPTIM_THREADS = 256


def _address(a):
    return int(a.data.ptr) if type(a).__module__.split(".")[0] == "cupy" else int(a.ctypes.data)


def _multi_tensor_table(lists, xp):
    """(device int64 table, nt, nb, keep-alive list) for optim.cu's kernels; None when the
    lists do not qualify (dtypes, shapes, layouts).

    lists[0] are the parameters, lists[1] the gradients (copied when not contiguous), the
    rest optimizer state; all but the gradients are updated in place, so they must be
    C-contiguous.
    """
    params = lists[0]
    dt = params[0].dtype
    if dt not in _CTYPES:
        return None
    keep = []
    rows = []
    for li, lst in enumerate(lists):
        row = []
        for a, p in zip(lst, params):
            if a is None or a.dtype != dt or a.shape != p.shape or \
                    array_module(a) is not xp:
                return None
            if not a.flags.c_contiguous:
                if li != 1:
                    return None
                a = xp.ascontiguousarray(a)
                keep.append(a)
            row.append(_address(a))
        rows.append(row)
    sizes = [int(p.size) for p in params]
    blk_tensor, blk_start = [], []
    for i, n in enumerate(sizes):
        for s in range(0, n, OPTIM_CHUNK):
            blk_tensor.append(i)
            blk_start.append(s)
    host = np.array([v for row in rows for v in row] + sizes + blk_tensor + blk_start,
                    dtype=np.int64)
    return xp.asarray(host), len(params), len(blk_tensor), keep


def _optim_grid(nb, some_array):
    return max(1, min(nb, _wave_blocks(some_array, OPTIM_THREADS)))


@register_kernel("cuda", "sgd_step")
def sgd_step(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
             maximize):
    """One launch updating every parameter (same dtype, same device) in place; returns None,
    or NotImplemented when the lists do not qualify (the optimizer then loops)."""
    if not params:
        return None
    xp = array_module(params[0])
    has_buf = momentum != 0
    lists = [params, grads] + ([momentum_buffers] if has_buf else [])
    got = _multi_tensor_table(lists, xp)
    if got is None:
        return NotImplemented
    tab, nt, nb, _keep = got
    if nb == 0:
        return None
    t = _CTYPES[params[0].dtype]
    dt = params[0].dtype.type
    launch("optim.cu", f"sgd_step_multi<{t}>", _optim_grid(nb, params[0]), OPTIM_THREADS,
           (tab, np.int32(nt), np.int32(nb), dt(lr), dt(momentum), dt(1 - dampening),
            dt(weight_decay), np.int32(dampening == 0), np.int32(bool(nesterov)),
            np.int32(bool(maximize)), np.int32(has_buf)))
    return None


@register_kernel("cuda", "adam_step")
def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
              eps, weight_decay, amsgrad, decoupled_weight_decay, maximize):
    """Adam / AdamW for every parameter in one launch; ``steps`` are the per-parameter step
    counts after this step's increment. Returns None, or NotImplemented to decline."""
    if not params:
        return None
    xp = array_module(params[0])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    if amsgrad and max_exp_avg_sqs is None:
        return NotImplemented
    got = _multi_tensor_table(lists, xp)
    if got is None:
        return NotImplemented
    tab, nt, nb, _keep = got
    if nb == 0:
        return None
    # per-tensor constants, in double on the host as the CPU optimizer computes them
    hyper = np.empty(2 * nt, np.float64)
    for i, step in enumerate(steps):
        hyper[2 * i] = lr / (1 - beta1 ** step)
        hyper[2 * i + 1] = (1 - beta2 ** step) ** 0.5
    t = _CTYPES[params[0].dtype]
    dt = params[0].dtype.type
    launch("optim.cu", f"adam_step_multi<{t}>", _optim_grid(nb, params[0]), OPTIM_THREADS,
           (tab, xp.asarray(hyper), np.int32(nt), np.int32(nb), dt(1 - beta1), dt(beta2),
            dt(1 - beta2), dt(eps), dt(weight_decay), dt(1 - lr * weight_decay),
            np.int32(bool(amsgrad)), np.int32(bool(decoupled_weight_decay)),
            np.int32(bool(maximize))))
    return None
