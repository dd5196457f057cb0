"""Dropout as one primitive op (F.dropout and F.dropout2d are in gpudiff/nn/functional.py).

  'dropout'   y = x * keep(i // group) / (1 - p): group 1 is F.dropout, group H*W is
              F.dropout2d (one draw per channel); linear in x, so its gradient is the same
              op with the same seed

Masks are counter-based: keep(j) is a hash of (seed, j) (csrc/cpu/norm.cpp gives the formula;
``dropout_keep_ref`` is the same in xp), the seed drawn from gpudiff's generator per call.
Nothing is stored for the backward, and kernel and reference agree bit for bit.
"""
import math

import numpy as np

from . import Op, forward_of

_MIX1, _MIX2 = 0x21F0AAAD, 0x735A2D97


def _mix32(xp, v):
    """The 32-bit integer hash of norm.cpp, on uint32 arrays (wrapping arithmetic)."""
    v = v ^ (v >> 16)
    v = v * xp.uint32(_MIX1)
    v = v ^ (v >> 15)
    v = v * xp.uint32(_MIX2)
    return v ^ (v >> 15)


def _mix32_int(v):
    v &= 0xFFFFFFFF
    v ^= v >> 16
    v = (v * _MIX1) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * _MIX2) & 0xFFFFFFFF
    return v ^ (v >> 15)


def dropout_keep_ref(xp, count, p, seed):
    """keep[j] for j < count: True with probability 1 - p (to 2^-24), a hash of (seed, j).
    ``seed``: an int, or a 0-d uint64 device array (a graph capture's seed, which each replay
    changes on the device: runtime/capture.py); both give the same bits."""
    with np.errstate(over="ignore"):  # (0-d arrays: NumPy warns where uint32 products wrap)
        if isinstance(seed, int):
            k0 = xp.uint32(_mix32_int((seed & 0xFFFFFFFF) ^ 0x9E3779B9))
            k1 = xp.uint32(_mix32_int((seed >> 32) ^ 0x85EBCA6B))
        else:
            k0 = _mix32(xp, (seed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
                        ^ np.uint32(0x9E3779B9))
            k1 = _mix32(xp, (seed >> np.uint64(32)).astype(np.uint32) ^ np.uint32(0x85EBCA6B))
        j = xp.arange(count, dtype=np.uint64)
        lo, hi = (j & 0xFFFFFFFF).astype(np.uint32), (j >> 32).astype(np.uint32)
        h = _mix32(xp, _mix32(xp, lo ^ k0) + k1 + hi)
    return (h >> 8) >= math.ceil(p * 16777216.0)


def dropout_ref(xp, x, p, seed, group):
    keep = dropout_keep_ref(xp, x.size // group, p, seed)
    scale = x.dtype.type(1 / (1 - p)) if p < 1 else x.dtype.type(0)
    m = xp.where(keep, scale, x.dtype.type(0)).astype(x.dtype)
    return (x.reshape(-1, group) * m[:, None]).reshape(x.shape)


class dropout(Op):
    """y = x * keep(i // group) / (1 - p), with keep a hash of (seed, i // group)."""


    def forward(ctx, x, *, p, seed, group):
        ctx.p = {"p": p, "seed": seed, "group": group}
        if not isinstance(seed, int):  # a capture's device seed: this replay's value, read
            if ctx.device.type != "cpu":  # on the device (the xp hash: as a GPU graph must)
                return dropout_ref(ctx.xp, x, p, seed.value(), group)
            seed = int(seed.value())  # (CPU memory is the host's: the C++ kernel then)
        k = ctx.kernel("dropout")
        y = k(x, p, seed, group) if k else None
        return dropout_ref(ctx.xp, x, p, seed, group) if y is None else y

    def backward(ctx, gy):
        return dropout.apply(gy, **ctx.p)  # linear in x: the same mask, the same scale

    def backward_arrays(ctx, gy):
        return forward_of(dropout, ctx, gy, **ctx.p)
