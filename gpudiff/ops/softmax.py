"""softmax and log_softmax (with their backward ops) and the fused softmax cross-entropy.

Forward and backward use the device's fast kernel when it has one and the xp-generic reference
otherwise.
"""
from ..autograd.grad_mode import is_grad_enabled
from . import Op, forward_of
from .lowp import compute_in_float32
from . import run_kernel as _run


class softmax(Op):
    def forward(ctx, x, *, dim):
        ctx.dim = dim
        y = _run(ctx, "softmax", x, dim)
        if y is None:
            xp = ctx.xp
            e = xp.exp(x - xp.max(x, axis=dim, keepdims=True))
            y = e / e.sum(axis=dim, keepdims=True)
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return softmax_backward.apply(gy, y, dim=ctx.dim)

    def backward_arrays(ctx, gy):
        y, = ctx.saved_arrays
        return forward_of(softmax_backward, ctx, gy, y, dim=ctx.dim)


class softmax_backward(Op):
    """gx = y * (gy - sum(gy * y, dim))"""

    def forward(ctx, gy, y, *, dim):
        ctx.dim = dim
        ctx.save_for_backward(gy, y)
        gx = _run(ctx, "softmax_backward", y, gy, dim)
        if gx is None:
            gx = y * (gy - (gy * y).sum(axis=dim, keepdims=True))
        return gx

    def backward(ctx, ggx):
        gy, y = ctx.saved_tensors
        d = ctx.dim
        s = (gy * y).sum(dim=d, keepdim=True)
        t = (ggx * y).sum(dim=d, keepdim=True)
        return y * (ggx - t), ggx * (gy - s) - gy * t


class log_softmax(Op):
    def forward(ctx, x, *, dim):
        ctx.dim = dim
        y = _run(ctx, "log_softmax", x, dim)
        if y is None:
            xp = ctx.xp
            s = x - xp.max(x, axis=dim, keepdims=True)
            y = s - xp.log(xp.exp(s).sum(axis=dim, keepdims=True))
        ctx.save_for_backward(y)
        return y

    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return log_softmax_backward.apply(gy, y, dim=ctx.dim)

    def backward_arrays(ctx, gy):
        y, = ctx.saved_arrays
        return forward_of(log_softmax_backward, ctx, gy, y, dim=ctx.dim)


class log_softmax_backward(Op):
    """gx = gy - exp(y) * sum(gy, dim)"""

    def forward(ctx, gy, y, *, dim):
        ctx.dim = dim
        ctx.save_for_backward(gy, y)
        gx = _run(ctx, "log_softmax_backward", y, gy, dim)
        if gx is None:
            gx = gy - ctx.xp.exp(y) * gy.sum(axis=dim, keepdims=True)
        return gx

    def backward(ctx, ggx):
        gy, y = ctx.saved_tensors
        d = ctx.dim
        p = y.exp()
        sg = gy.sum(dim=d, keepdim=True)
        gg_gy = ggx - (ggx * p).sum(dim=d, keepdim=True)
        gg_y = -ggx * p * sg
        return gg_gy, gg_y


class cross_entropy(Op):
    """Per-sample softmax cross-entropy of logits (N, C) and class indices (N,).

    One pass per row computes the loss and d loss / d logits (kept for backward).
    Returns losses (N,): weighted, label-smoothed, 0 where target == ignore_index.
    """

    def forward(ctx, logits, target, weight, *, ignore_index=-100, label_smoothing=0.0):
        k = ctx.kernel("cross_entropy")
        out = k(logits, target, weight, ignore_index, label_smoothing) if k else None
        if out is None:
            out = cross_entropy_reference(ctx.xp, logits, target, weight, ignore_index,
                                          label_smoothing)
        losses, dlogits = out
        ctx.ls, ctx.ii = label_smoothing, ignore_index
        ctx.save_for_backward(logits, target, weight, dlogits)
        return losses

    def backward(ctx, gy):
        logits, target, weight, dlogits = ctx.saved_tensors
        if not is_grad_enabled():  # plain backward: the fused kernel's rows, one multiply
            return dlogits * gy.unsqueeze(1), None, None
        # create_graph: rebuild d loss / d logits from differentiable ops
        return _ce_dlogits(logits, target, weight, ctx.ii, ctx.ls) * gy.unsqueeze(1), None, None

    def backward_arrays(ctx, gy):
        dlogits = ctx.saved_arrays[3]
        return dlogits * gy[:, None], None, None


def _ce_dlogits(logits, target, weight, ignore_index, eps):
    """d losses[i] / d logits[i], in gpudiff ops (the differentiable twin of the kernel)."""
    n, c = logits.shape
    p = logits.softmax(1)
    valid = target != ignore_index
    t = target.masked_fill(valid.logical_not(), 0)
    w = weight if weight is not None else p.new_ones((c,))
    wt = w[t] * valid.to(p.dtype)                              # (N,)
    onehot = p.new_zeros((n, c)).scatter_add(1, t.unsqueeze(1), p.new_ones((n, 1)))
    d = (1 - eps) * wt.unsqueeze(1) * (p - onehot)
    if eps:
        d = d + (eps / c) * (w.sum() * p - w) * valid.to(p.dtype).unsqueeze(1)
    return d


def cross_entropy_reference(xp, logits, target, weight, ignore_index, label_smoothing):
    """NumPy/CuPy reference of the fused kernel (same contract)."""
    n, c = logits.shape
    m = logits.max(axis=1, keepdims=True)
    z = logits - m
    lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    logp = z - lse                                     # (N, C)
    p = xp.exp(logp)
    valid = target != ignore_index                     # (N,)
    t = xp.where(valid, target, 0)
    w = xp.ones(c, dtype=logits.dtype) if weight is None else weight.astype(logits.dtype)
    wt = w[t] * valid                                  # (N,) weight of the target class
    eps = label_smoothing
    nll = -logp[xp.arange(n), t]
    losses = (1 - eps) * wt * nll
    onehot = xp.zeros_like(logits)
    onehot[xp.arange(n), t] = 1
    # d/dz of -w_t log p_t  = w_t (p - onehot)
    d = (1 - eps) * wt[:, None] * (p - onehot)
    if eps:
        # smoothing term: eps/C * sum_c w_c (-log p_c); d/dz = eps/C * (sum(w) p - w)
        losses = losses + eps / c * (-(w * logp).sum(axis=1)) * valid
        d = d + (eps / c) * (w.sum() * p - w) * valid[:, None]
    return losses.astype(logits.dtype), d.astype(logits.dtype)


compute_in_float32(softmax, softmax_backward, log_softmax, log_softmax_backward,
                   cross_entropy)
