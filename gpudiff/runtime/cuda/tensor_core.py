"""Tensor-core kernels of csrc/cuda/tensor_core.cu: TF32 / FP16 / BF16 convolutions and GEMMs.

The kernels multiply with ``mma.sync`` (m16n8k8 TF32; m16n8k16 FP16 and BF16) and accumulate
in fp32; on the emulated device the emulator's mma warp meeting computes the same products
from the lanes' fragment registers (docs/EMULATOR.md). They write fp32; the wrappers here
cast the result to the input dtype (float16 / bfloat16 stay float16 / bfloat16, as cuDNN's
outputs do; uint16 arrays, read as the bits of ``prec``, give the fp32 accumulators: tests).

Precisions, by input dtype:
  float32                        'tf32': operands rounded to TF32 (cvt.rna.tf32.f32) in the
                                 kernel, when the caller allows TF32 (conv.py:
                                 ``allow_tf32``, gpudiff.backends.cudnn.allow_tf32; the
                                 'matmul' kernel: ``matmul_allow_tf32``,
                                 gpudiff.backends.cuda.matmul.allow_tf32)
  float16                        'f16'
  bfloat16 (ml_dtypes.bfloat16)  'bf16'
Half-precision arrays reach the kernels as uint16 views (their bits), so the kernels need no
half type.

Functions (raw arrays in, raw arrays out, None when they cannot handle the input):
  conv2d_forward(x, w, b, geom)      -> y in x's dtype
  conv2d_backward_input(gy, w, geom) -> gx
  conv2d_backward_weight(gy, x, geom)-> gw
  gemm(a, b)                         -> a @ b (2-D)
and the 'matmul' entry of the cuda kernel table (linear layers' and 2-D matmul's GEMM).
``round_tf32`` is the host twin of the kernels' rounding (tests build references with it).
"""
import math

import numpy as np

from ..kernels import register_kernel
from .launch import THREADS, array_module, fits_int32, grid_1d, i32, is_cupy, launch, sm_count

SOURCE = "tensor_core.cu"
BM = BN = 64          # block tile (csrc/cuda/tensor_core.cu)
BKW = 16              # reduction words a step: 16 TF32 or 32 half elements
THREADS_TC = 128
PRECISIONS = ("tf32", "f16", "bf16")
_TEMPLATE = {"tf32": "tc::Tf32", "f16": "tc::F16", "bf16": "tc::Bf16"}

#: gpudiff.backends.cuda.matmul.allow_tf32 (PyTorch's default False): float32 2-D matmuls and
#: linear layers on CUDA use the TF32 GEMM when True
matmul_allow_tf32 = False
#: pass -> precision of the latest tensor-core call ('tf32', 'f16', 'bf16'); tests read it
last_precision = {}

WGRAD_BLOCKS_PER_SM = 4
WGRAD_MIN_CHUNK = 256
WGRAD_MAX_WORKSPACE = 1 << 26


def is_bfloat16(dtype):
    return getattr(dtype, "name", str(dtype)) == "bfloat16"


def precision_of(*arrays, allow_tf32=True):
    """'tf32' / 'f16' / 'bf16' for arrays (None ignored) sharing a dtype the kernels take, else
    None. float32 gives 'tf32' only when ``allow_tf32``."""
    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return None
    dt = arrays[0].dtype
    if any(a.dtype != dt for a in arrays):
        return None
    if dt == np.float32:
        return "tf32" if allow_tf32 else None
    if dt == np.float16:
        return "f16"
    if is_bfloat16(dt):
        return "bf16"
    return None


def _operand(a):
    """What the kernel reads: float32 as is, 16-bit floats as their uint16 bits."""
    a = array_module(a).ascontiguousarray(a)
    return a if a.dtype == np.float32 else a.view(np.uint16)


def _out(y, dtype):
    """The kernel's fp32 result as the inputs' dtype: float16 / bfloat16 inputs give float16 /
    bfloat16; float32 and raw uint16 bit patterns (tests) give the fp32 accumulators."""
    return y.astype(dtype) if dtype == np.float16 or is_bfloat16(dtype) else y


def _name(kernel, prec, *flags):
    args = [_TEMPLATE[prec]] + ["true" if f else "false" for f in flags]
    return f"{kernel}<{', '.join(args)}>"


def _grid(cols, rows, z):
    return (math.ceil(cols / BN), math.ceil(rows / BM), z)


def round_tf32(a):
    """float32 ``a`` rounded to TF32 as cvt.rna.tf32.f32 (and tensor_core.cu) does: 10 mantissa
    bits, to nearest with ties away from zero; inf stays, NaN becomes 0x7fffffff."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    special = (u & 0x7F800000) == 0x7F800000
    r = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).astype(np.uint32)
    r = np.where(special, np.where(u & 0x7FFFFF, np.uint32(0x7FFFFFFF), u), r)
    return r.astype(np.uint32).view(np.float32).reshape(a.shape)


# ---- convolution ---------------------------------------------------------------------------------
def conv2d_forward(x, w, b, geom, prec, out=None):
    """y (N, K, OH, OW) in x's dtype = conv2d(x, w) + b, on the tensor cores in ``prec``
    (``out``: a contiguous float32 array to write instead of a new one; all three passes)."""
    xp = array_module(x)
    g = geom
    y = xp.empty((g.N, g.K, g.OH, g.OW), np.float32) if out is None else out
    has_bias = b is not None
    bias = xp.ascontiguousarray(b, dtype=np.float32) if has_bias else xp.zeros(1, np.float32)
    if y.size:
        launch(SOURCE, _name("conv2d_fwd_tc", prec), _grid(g.N * g.OH * g.OW, g.Kg, g.G),
               THREADS_TC, (_operand(x), _operand(w), bias, y) + i32(*g.kernel_args())
               + i32(has_bias))
    last_precision["forward"] = prec
    return _out(y, x.dtype)


def dgrad_weights(w, geom):
    """wt (G, Cg, Kg, KH, KW): each group's (k, c) axes of w swapped (as conv.py's dgrad)."""
    g = geom
    xp = array_module(w)
    return xp.ascontiguousarray(w.reshape(g.G, g.Kg, g.Cg, g.kh, g.kw).transpose(0, 2, 1, 3, 4))


def conv2d_backward_input(gy, w, geom, prec, out=None):
    """gx (N, C, H, W) in gy's dtype of y = conv2d(x, w)."""
    xp = array_module(gy)
    g = geom
    gx = xp.empty((g.N, g.C, g.H, g.W), np.float32) if out is None else out
    if gx.size:
        launch(SOURCE, _name("conv2d_dgrad_tc", prec), _grid(g.N * g.H * g.W, g.Cg, g.G),
               THREADS_TC, (_operand(gy), _operand(dgrad_weights(w, g)), gx)
               + i32(*g.kernel_args()))
    last_precision["backward_input"] = prec
    return _out(gx, gy.dtype)


def wgrad_splits(geom, some_array, prec):
    """(splits, chunk) of the N*OH*OW reduction over blocks (whole steps per split)."""
    g = geom
    rg = g.Cg * g.kh * g.kw
    p = g.N * g.OH * g.OW
    bk = BKW * (1 if prec == "tf32" else 2)
    tiles = math.ceil(rg / BN) * math.ceil(g.Kg / BM) * g.G
    want = math.ceil(WGRAD_BLOCKS_PER_SM * sm_count(some_array) / tiles)
    splits = max(1, min(want, p // WGRAD_MIN_CHUNK, WGRAD_MAX_WORKSPACE // max(1, g.K * rg),
                        65535 // g.G))
    chunk = math.ceil(math.ceil(p / splits) / bk) * bk
    return math.ceil(p / chunk), chunk


def conv2d_backward_weight(gy, x, w_shape, geom, prec, out=None):
    """gw (K, C/G, KH, KW) in gy's dtype of y = conv2d(x, w)."""
    xp = array_module(gy)
    g = geom
    shape = tuple(int(v) for v in w_shape)
    gw = xp.empty(shape, np.float32) if out is None else out
    if gw.size:
        if gy.size == 0:
            gw[...] = 0
        else:
            splits, chunk = wgrad_splits(g, gy, prec)
            ws = gw if splits == 1 else xp.empty((splits,) + shape, np.float32)
            rg = g.Cg * g.kh * g.kw
            launch(SOURCE, _name("conv2d_wgrad_tc", prec), _grid(rg, g.Kg, g.G * splits),
                   THREADS_TC, (_operand(gy), _operand(x), ws) + i32(*g.kernel_args())
                   + i32(chunk))
            if splits > 1:
                launch("conv.cu", "conv2d_wgrad_reduce<float>", grid_1d(gw.size, gy), THREADS,
                       (ws, gw, np.int64(gw.size), np.int32(splits)))
    last_precision["backward_weight"] = prec
    return _out(gw, gy.dtype)


# ---- GEMM --------------------------------------------------------------------------------------
def _strided(a):
    """(array the kernel reads, row stride, k stride, loads along k) for a 2-D operand read as
    (rows, k): C-order as is, a transposed C-order array through its base (no copy)."""
    if a.flags.c_contiguous:
        return a, a.shape[1], 1, True
    if a.T.flags.c_contiguous:  # Fortran order: e.g. w.T of a linear layer
        return a.T, 1, a.shape[0], False
    return array_module(a).ascontiguousarray(a), a.shape[1], 1, True


def gemm(a, b, prec):
    """a (M, K) @ b (K, N) on the tensor cores, in a's dtype."""
    xp = array_module(a)
    M, K = a.shape
    N = b.shape[1]
    c = xp.empty((M, N), np.float32)
    if c.size:
        if K == 0:
            c[...] = 0
        else:
            # A read as (m, k), B as (n, k): B's rows are b's columns. Kernels exist for
            # loads (along k, along k), (along k, along rows), (along rows, along rows)
            ab, sam, sak, a_k = _strided(a)
            bt, sbn, sbk, b_k = _strided(b.T)
            if b_k and not a_k:
                ab, sam, sak, a_k = xp.ascontiguousarray(a), K, 1, True
            launch(SOURCE, _name("gemm_tc", prec, a_k, b_k), _grid(N, M, 1), THREADS_TC,
                   (_operand(ab), _operand(bt), c) + i32(M, N, K)
                   + tuple(np.int64(v) for v in (sam, sak, sbk, sbn)))
    last_precision["matmul"] = prec
    return _out(c, a.dtype)


@register_kernel("cuda", "matmul")
def matmul(a, b):
    """c = a @ b for 2-D float32 (TF32 when ``matmul_allow_tf32``), float16, bfloat16."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        return None
    prec = precision_of(a, b, allow_tf32=matmul_allow_tf32)
    if prec is None or not fits_int32(a.size, b.size, a.shape[0] * b.shape[1]):
        return None
    if not (is_cupy(a) or isinstance(a, np.ndarray)):
        return None
    return gemm(a, b, prec)
