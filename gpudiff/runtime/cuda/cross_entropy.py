"""The fused softmax cross-entropy of csrc/cuda/cross_entropy.cu: one pass per row gives the
row's loss and its gradient (contract: gpudiff/runtime/kernels.py).
"""
import numpy as np

from ..kernels import register_kernel
from .launch import SMALL_ROW_MAX_COLS, array_module, ctype, launch, row_config, small_row_config


@register_kernel("cuda", "cross_entropy")
def cross_entropy(logits, target, weight, ignore_index, label_smoothing):
    """(losses (N,), dlogits (N, C)) for logits (N, C) and int target (N,); see kernels.py."""
    t = ctype(logits)
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
