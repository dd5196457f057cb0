"""The fused multi-tensor optimizer steps of csrc/cuda/optim.cu (SGD with momentum / Nesterov /
weight decay, Adam / AdamW, AMP's unscale + inf/NaN check): one launch per dtype group, the
tensors' addresses in a table.
"""

import numpy as np

from ..kernels import register_kernel
from .launch import CTYPES, address, array_module, launch, wave_blocks

OPTIM_CHUNK = 2048   # elements per block: csrc/cuda/optim.cu opt::CHUNK
OPTIM_THREADS = 256


def _multi_tensor_table(lists, xp):
    """(device int64 table, nt, nb, keep-alive list) for optim.cu's kernels; None when the
    lists do not qualify (dtypes, shapes, layouts).

    lists[0] are the parameters, lists[1] the gradients (copied when not contiguous), the
    rest optimizer state; all but the gradients are updated in place, so they must be
    C-contiguous.
    """
    params = lists[0]
    dt = params[0].dtype
    if dt not in CTYPES:
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
            row.append(address(a))
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
    return max(1, min(nb, wave_blocks(some_array, OPTIM_THREADS)))


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
    t = CTYPES[params[0].dtype]
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
    t = CTYPES[params[0].dtype]
    dt = params[0].dtype.type
    launch("optim.cu", f"adam_step_multi<{t}>", _optim_grid(nb, params[0]), OPTIM_THREADS,
           (tab, xp.asarray(hyper), np.int32(nt), np.int32(nb), dt(1 - beta1), dt(beta2),
            dt(1 - beta2), dt(eps), dt(weight_decay), dt(1 - lr * weight_decay),
            np.int32(bool(amsgrad)), np.int32(bool(decoupled_weight_decay)),
            np.int32(bool(maximize))))
    return None


@register_kernel("cuda", "amp_unscale")
def amp_unscale(grads, inv_scale):
    """Multiply every array of ``grads`` (one dtype, one device, C-contiguous) by
    ``inv_scale`` in place, in one launch; returns whether any held an inf or NaN, or
    NotImplemented when the list does not qualify (the caller then uses NumPy / CuPy)."""
    if not grads:
        return False
    xp = array_module(grads[0])
    if any(not a.flags.c_contiguous for a in grads):
        return NotImplemented
    got = _multi_tensor_table([grads], xp)
    if got is None:
        return NotImplemented
    tab, nt, nb, _keep = got
    if nb == 0:
        return False
    flags = xp.zeros(nb, np.int32)
    t = CTYPES[grads[0].dtype]
    launch("optim.cu", f"amp_unscale_multi<{t}>", _optim_grid(nb, grads[0]), OPTIM_THREADS,
           (tab, np.int32(nt), np.int32(nb), grads[0].dtype.type(inv_scale), flags))
    return bool(flags.any())
