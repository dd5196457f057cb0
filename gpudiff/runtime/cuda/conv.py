"""Convolution for the 'cuda' kernel table: csrc/cuda/conv.cu, and im2col.cu + xp.matmul.

Contract: gpudiff/runtime/kernels.py. Each wrapper takes the raw arrays of cuda tensors
(CuPy on a GPU, NumPy on the emulated device), picks the algorithm and launch configuration,
and launches kernels of csrc/cuda/conv.cu (and im2col.cu) through
launch.launch: the same code path runs on a GPU and, in CI, on the emulator. A wrapper
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

Tensor cores (csrc/cuda/tensor_core.cu, wrappers in tensor_core.py): float16 and bfloat16
convolutions always run the FP16 / BF16 implicit-GEMM kernels (mma.sync m16n8k16, fp32
accumulation; the only CUDA kernels of ours for 16-bit floats). float32 convolutions run the
TF32 implicit-GEMM kernels (mma.sync m16n8k8, operands rounded with cvt.rna.tf32.f32) when
``allow_tf32`` (gpudiff.backends.cudnn.allow_tf32, default True as PyTorch's) and the
algorithm is 'implicit_gemm' ('auto' picks it for every non-depthwise convolution then);
'im2col' and 'direct' stay FP32, and so does everything with ``allow_tf32 = False``.

``last_conv_algorithm`` and ``conv_algorithm_counts`` say which path ran (the benchmark and
profiler read them), ``last_conv_math`` in which arithmetic ('fp32', 'fp64', 'tf32', 'f16',
'bf16'); ``use_conv_algorithm(name)`` forces an algorithm for a block of code.
"""
import collections
import contextlib
import importlib
import math

import numpy as np

from ...geometry import ConvGeom
from ..kernels import register_kernel
from . import tensor_core
from .im2col import run_col2im, run_im2col
from .launch import (
    THREADS,
    array_module,
    ctype,
    grid_1d,
    i32,
    is_cupy,
    launch,
    sm_count,
    unbatch,
    wave_blocks,
)

# ---- settings and bookkeeping ---------------------------------------------------------------
CONV_ALGORITHMS = ("auto", "implicit_gemm", "im2col", "direct")
conv_algorithm = "auto"
#: the cuDNN-style switches (gpudiff.backends.cudnn): our convolution kernels play cuDNN's role.
#: enabled=False: the convolution ops run their im2col + GEMM reference instead; benchmark:
#: 'auto' times the algorithms once per geometry on a real GPU (the heuristic on the emulator)
enabled = True
benchmark = False
#: gpudiff.backends.cudnn.allow_tf32: float32 convolutions may run on the TF32 tensor cores
allow_tf32 = True
#: (pass, geometry, dtype) -> the algorithm benchmark chose
benchmark_cache = {}
#: pass ('forward', 'backward_input', 'backward_weight') -> algorithm of the latest call
last_conv_algorithm = {}
#: (pass, algorithm) -> number of calls since import (or reset_conv_log())
conv_algorithm_counts = collections.Counter()
#: pass -> the arithmetic of the latest call: 'fp32', 'fp64', 'tf32', 'f16' or 'bf16'
last_conv_math = {}

# Launch parameters (an H100 has 132 SMs, 2048 resident threads each).
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
    last_conv_math.clear()


@contextlib.contextmanager
def use_tf32(flag):
    """``with use_tf32(False): ...`` sets ``allow_tf32`` for a block of code."""
    global allow_tf32
    old, allow_tf32 = allow_tf32, bool(flag)
    try:
        yield
    finally:
        allow_tf32 = old


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



def choose_conv_algorithm(geom, pass_="forward", tf32=False):
    """What 'auto' runs for ``geom`` (a ConvGeom), ``pass_`` one of forward,
    backward_input, backward_weight; ``tf32``: the TF32 tensor cores are allowed (then
    implicit GEMM, on them, for everything but depthwise). See the module docstring."""
    if geom.depthwise():
        return "direct"
    if tf32:
        return "implicit_gemm"
    if geom.pointwise():
        return "im2col"
    if geom.Kg >= IM2COL_MIN_ROWS and geom.Cg * geom.kh * geom.kw >= IM2COL_MIN_DEPTH:
        return "im2col"
    return "implicit_gemm"


def _tf32(*arrays):
    """Whether a float32 pass on these arrays may use the TF32 tensor cores."""
    return allow_tf32 and tensor_core.precision_of(*arrays) == "tf32"


def _half(pass_, *arrays):
    """'f16' / 'bf16' when the arrays are 16-bit floats (logged as implicit GEMM), else None."""
    prec = tensor_core.precision_of(*arrays, allow_tf32=False)
    if prec is not None:
        last_conv_algorithm[pass_] = "implicit_gemm"
        conv_algorithm_counts[(pass_, "implicit_gemm")] += 1
        last_conv_math[pass_] = prec
    return prec


def _math(pass_, algo, tf32, dtype):
    last_conv_math[pass_] = "tf32" if tf32 and algo == "implicit_gemm" else \
        ("fp64" if dtype == np.float64 else "fp32")


def _algorithm(geom, pass_, run, some_array, tf32=False):
    """The algorithm of this pass: the forced one, else (``auto``) the benchmarked fastest
    (``benchmark`` on a real GPU) or the heuristic. ``run(algo)`` runs the pass."""
    algo = conv_algorithm
    if algo not in CONV_ALGORITHMS:
        raise ValueError(f"gpudiff.backends.cuda.conv_algorithm must be one of "
                         f"{CONV_ALGORITHMS}, got {algo!r}")
    if algo == "auto":
        if benchmark and is_cupy(some_array):
            algo = _fastest(geom, pass_, run, some_array, tf32=tf32)
        else:  # (the emulator's times say nothing about a GPU's: the heuristic there)
            algo = choose_conv_algorithm(geom, pass_, tf32)
    last_conv_algorithm[pass_] = algo
    conv_algorithm_counts[(pass_, algo)] += 1
    _math(pass_, algo, tf32, some_array.dtype)
    return algo


def _fastest(geom, pass_, run, some_array, repeats=3, tf32=False):
    """cudnn.benchmark on a real GPU: time every algorithm once per (pass, geometry, dtype,
    TF32 allowed) with CUDA events and keep the fastest (not yet run on a GPU)."""
    key = (pass_, geom.kernel_args(), some_array.dtype.str, tf32)
    best = benchmark_cache.get(key)
    if best is None:
        cupy = importlib.import_module("cupy")
        times = {}
        for algo in CONV_ALGORITHMS[1:]:
            run(algo)                                    # warm-up (compiles the module)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(repeats):
                run(algo)
            end.record()
            end.synchronize()
            times[algo] = cupy.cuda.get_elapsed_time(start, end)
        best = benchmark_cache[key] = min(times, key=times.get)
    return best


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


# ---- convolution: forward -------------------------------------------------------------------
@register_kernel("cuda", "conv2d")
def conv2d(x, w, b, stride, padding, dilation, groups):
    """y (N, K, OH, OW) = conv2d(x (N, C, H, W), w (K, C/groups, KH, KW)) + b (K,)."""
    t = ctype(x, w, b)
    half = tensor_core.precision_of(x, w, b, allow_tf32=False)
    if (t is None and half is None) or not enabled or x.ndim not in (3, 4) or w.ndim != 4:
        return None
    x, unbatched = unbatch(x)
    geom = ConvGeom(x.shape, w.shape, stride, padding, dilation, groups)
    if not geom.valid():
        return None
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    w = xp.ascontiguousarray(w)
    if _half("forward", x, w, b):
        y = tensor_core.conv2d_forward(x, w, b, geom, half)
        return y[0] if unbatched else y
    tf32 = _tf32(x, w, b)
    y = xp.empty((geom.N, geom.K, geom.OH, geom.OW), x.dtype)

    def run(algo):
        if algo == "im2col":
            _conv2d_im2col(x, w, b, y, geom, t)
            return
        has_bias = b is not None
        bias = xp.ascontiguousarray(b) if has_bias else xp.zeros(1, x.dtype)
        if algo == "direct":
            launch("conv.cu", f"conv2d_fwd_direct<{t}>", grid_1d(y.size, x), THREADS,
                   (x, w, bias, y) + i32(*geom.kernel_args()) + i32(has_bias))
        elif tf32:
            tensor_core.conv2d_forward(x, w, b, geom, "tf32", out=y)
        else:
            tile = _tile(geom.Kg)
            launch("conv.cu", _igemm_name("conv2d_fwd_igemm", t, tile),
                   _igemm_grid(geom.N * geom.OH * geom.OW, geom.Kg, geom.G, tile),
                   _igemm_threads(tile),
                   (x, w, bias, y) + i32(*geom.kernel_args()) + i32(has_bias))
    if y.size:
        run(_algorithm(geom, "forward", run, x, tf32))
    return y[0] if unbatched else y


def _conv2d_im2col(x, w, b, y, geom, t):
    xp = array_module(x)
    g = geom
    rg = g.Cg * g.kh * g.kw
    wm = w.reshape(g.G, g.Kg, rg)
    step = _batch_chunk(g, x.itemsize, g.C * g.kh * g.kw)
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        cols = run_im2col(x[n0:n1], g, t).reshape(n1 - n0, g.G, rg, g.OH * g.OW)
        # (G, Kg, Rg) @ (n, G, Rg, OHW) -> (n, G, Kg, OHW)
        y[n0:n1] = xp.matmul(wm, cols).reshape(n1 - n0, g.K, g.OH, g.OW)
    if b is not None:
        y += b.reshape(1, g.K, 1, 1)


# ---- convolution: input gradient ------------------------------------------------------------
@register_kernel("cuda", "conv2d_backward_input")
def conv2d_backward_input(gy, w, x_shape, stride, padding, dilation, groups):
    """gx (N, C, H, W) of y = conv2d(x, w): also conv_transpose2d's forward."""
    t = ctype(gy, w)
    half = tensor_core.precision_of(gy, w, allow_tf32=False)
    if (t is None and half is None) or not enabled or gy.ndim not in (3, 4) or w.ndim != 4 \
            or len(x_shape) != gy.ndim:
        return None
    gy, unbatched = unbatch(gy)
    x_shape = (1,) + tuple(x_shape) if unbatched else tuple(x_shape)
    geom = ConvGeom(x_shape, w.shape, stride, padding, dilation, groups)
    if not geom.valid() or gy.shape != (geom.N, geom.K, geom.OH, geom.OW):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    w = xp.ascontiguousarray(w)
    if _half("backward_input", gy, w):
        gx = tensor_core.conv2d_backward_input(gy, w, geom, half)
        return gx[0] if unbatched else gx
    tf32 = _tf32(gy, w)
    gx = xp.empty((geom.N, geom.C, geom.H, geom.W), gy.dtype)

    def run(algo):
        if algo == "im2col":
            _dgrad_im2col(gy, w, gx, geom, t)
        elif algo == "direct":
            launch("conv.cu", f"conv2d_dgrad_direct<{t}>", grid_1d(gx.size, gy), THREADS,
                   (gy, w, gx) + i32(*geom.kernel_args()))
        elif tf32:
            tensor_core.conv2d_backward_input(gy, w, geom, "tf32", out=gx)
        else:
            tile = _tile(geom.Cg)
            launch("conv.cu", _igemm_name("conv2d_dgrad_igemm", t, tile),
                   _igemm_grid(geom.N * geom.H * geom.W, geom.Cg, geom.G, tile),
                   _igemm_threads(tile),
                   (gy, _dgrad_weights(w, geom), gx) + i32(*geom.kernel_args()))
    if gx.size:
        if gy.size == 0:
            gx[...] = 0
        else:
            run(_algorithm(geom, "backward_input", run, gy, tf32))
    return gx[0] if unbatched else gx


def _dgrad_weights(w, geom):
    """wt (G, Cg, Kg, KH, KW): w (K, Cg, KH, KW) = (G, Kg, Cg, KH, KW) with (Kg, Cg) swapped,
    so that dgrad's A tiles (rows c, depth (k, i, j)) load contiguously. A copy of the
    weights only: small next to the activations."""
    g = geom
    xp = array_module(w)
    return xp.ascontiguousarray(
        w.reshape(g.G, g.Kg, g.Cg, g.kh, g.kw).transpose(0, 2, 1, 3, 4))


def _dgrad_im2col(gy, w, gx, geom, t):
    xp = array_module(gy)
    g = geom
    rg = g.Cg * g.kh * g.kw
    wt = w.reshape(g.G, g.Kg, rg).transpose(0, 2, 1)  # (G, Rg, Kg)
    step = _batch_chunk(g, gy.itemsize, g.C * g.kh * g.kw)
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        gyc = gy[n0:n1].reshape(n1 - n0, g.G, g.Kg, g.OH * g.OW)
        cols = xp.matmul(wt, gyc)  # (n, G, Rg, OHW), contiguous
        gx[n0:n1] = run_col2im(cols.reshape(n1 - n0, g.C * g.kh * g.kw, g.OH * g.OW), g, t)


# ---- convolution: weight gradient -----------------------------------------------------------
@register_kernel("cuda", "conv2d_backward_weight")
def conv2d_backward_weight(gy, x, w_shape, stride, padding, dilation, groups):
    """gw (K, C/groups, KH, KW) of y = conv2d(x, w)."""
    t = ctype(gy, x)
    half = tensor_core.precision_of(gy, x, allow_tf32=False)
    if (t is None and half is None) or not enabled or gy.ndim not in (3, 4) or x.ndim != gy.ndim \
            or len(w_shape) != 4:
        return None
    gy, _ = unbatch(gy)
    x, _ = unbatch(x)
    geom = ConvGeom(x.shape, w_shape, stride, padding, dilation, groups)
    if not geom.valid() or gy.shape != (geom.N, geom.K, geom.OH, geom.OW):
        return None
    xp = array_module(gy)
    gy = xp.ascontiguousarray(gy)
    x = xp.ascontiguousarray(x)
    if _half("backward_weight", gy, x):
        return tensor_core.conv2d_backward_weight(gy, x, w_shape, geom, half)
    tf32 = _tf32(gy, x)
    gw = xp.empty(tuple(int(v) for v in w_shape), gy.dtype)
    if gw.size == 0:
        return gw
    if gy.size == 0:
        gw[...] = 0
        return gw

    def run(algo):
        if algo == "im2col":
            _wgrad_im2col(gy, x, gw, geom, t)
        elif algo == "direct":
            threads = min(THREADS, max(32, 1 << (geom.N * geom.OH * geom.OW - 1).bit_length()))
            launch("conv.cu", f"conv2d_wgrad_direct<{t}>",
                   max(1, min(gw.size, wave_blocks(gy, threads))), threads,
                   (gy, x, gw) + i32(*geom.kernel_args()))
        elif tf32:
            tensor_core.conv2d_backward_weight(gy, x, w_shape, geom, "tf32", out=gw)
        else:
            _wgrad_igemm(gy, x, gw, geom, t)
    run(_algorithm(geom, "backward_weight", run, gy, tf32))
    return gw


def wgrad_splits(geom, some_array):
    """(splits, chunk): the split of the N*OH*OW reduction over blocks for implicit wgrad."""
    g = geom
    tile = _tile(g.Kg)
    rg = g.Cg * g.kh * g.kw
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
    rg = g.Cg * g.kh * g.kw
    splits, chunk = wgrad_splits(g, gy)
    ws = gw if splits == 1 else xp.empty((splits,) + gw.shape, gw.dtype)
    launch("conv.cu", _igemm_name("conv2d_wgrad_igemm", t, tile),
           _igemm_grid(rg, g.Kg, g.G * splits, tile), _igemm_threads(tile),
           (gy, x, ws) + i32(*g.kernel_args()) + i32(chunk))
    if splits > 1:
        launch("conv.cu", f"conv2d_wgrad_reduce<{t}>", grid_1d(gw.size, gy), THREADS,
               (ws, gw, np.int64(gw.size), np.int32(splits)))


def _wgrad_im2col(gy, x, gw, geom, t):
    xp = array_module(gy)
    g = geom
    rg = g.Cg * g.kh * g.kw
    step = _batch_chunk(g, x.itemsize, g.C * g.kh * g.kw)
    acc = None
    for n0 in range(0, g.N, step):
        n1 = min(g.N, n0 + step)
        cols = run_im2col(x[n0:n1], g, t).reshape(n1 - n0, g.G, rg, g.OH * g.OW)
        gyc = gy[n0:n1].reshape(n1 - n0, g.G, g.Kg, g.OH * g.OW)
        # (n, G, Kg, OHW) @ (n, G, OHW, Rg) -> (n, G, Kg, Rg), summed over the images
        part = xp.matmul(gyc, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        acc = part if acc is None else acc + part
    gw[...] = acc.reshape(gw.shape)
