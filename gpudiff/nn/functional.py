"""gpudiff.nn.functional (as ``F``): activations, losses, linear, pad, one_hot, layer_norm.

The CNN ops (conv2d, pools, batch_norm, dropout, interpolate) live in gpudiff/ops/conv.py,
pool.py and norm.py and are re-exported at the bottom.
"""
import math

import numpy as np

from .. import functions as fn
from ..functions import log_softmax, softmax  # noqa: F401
from ..ops import nn as N
from ..ops import shape as S
from ..tensor import Tensor

sigmoid = fn.sigmoid
tanh = fn.tanh
flatten = fn.flatten


# ---- activations ----------------------------------------------------------------------
# inplace=True passes a function to Tensor._inplace: the op then runs on a stand-in copy, so
# the input it saves for backward is not the buffer the in-place write overwrites
def relu(input, inplace=False):
    return input._inplace(N.relu.apply) if inplace else N.relu.apply(input)


def relu6(input, inplace=False):
    return hardtanh(input, 0.0, 6.0, inplace)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    def f(x):
        return N.leaky_relu.apply(x, negative_slope=negative_slope)
    return input._inplace(f) if inplace else f(input)


def elu(input, alpha=1.0, inplace=False):
    def f(x):
        return N.elu.apply(x, alpha=alpha)
    return input._inplace(f) if inplace else f(input)


def gelu(input, approximate="none"):
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * input * (1 + (c * (input + 0.044715 * input ** 3)).tanh())
    return 0.5 * input * (1 + fn.erf(input * (1 / math.sqrt(2.0))))


def silu(input, inplace=False):
    def f(x):
        return x * x.sigmoid()
    return input._inplace(f) if inplace else f(input)


def softplus(input, beta=1.0, threshold=20.0):
    return N.softplus.apply(input, beta=beta, threshold=threshold)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    def f(x):
        return x.clamp(min_val, max_val)
    return input._inplace(f) if inplace else f(input)


def logsigmoid(input):
    return -softplus(-input)


def softmin(input, dim=None):
    return softmax(-input, dim)


# ---- linear, padding, encoding ---------------------------------------------------------
def linear(input, weight, bias=None):
    """y = x W^T + b. input (..., in), weight (out, in), bias (out,)."""
    if input.shape[-1] != weight.shape[-1]:
        raise RuntimeError(f"linear: input shape {tuple(input.shape)} and weight shape "
                           f"{tuple(weight.shape)} do not align ({input.shape[-1]} != "
                           f"{weight.shape[-1]}): mat1 and mat2 shapes cannot be multiplied")
    out = input @ weight.t()
    return out if bias is None else out + bias


def bilinear(input1, input2, weight, bias=None):
    # weight (out, in1, in2): y_k = x1^T W_k x2 + b_k
    out = fn.stack([((input1 @ w) * input2).sum(-1) for w in weight], -1)
    return out if bias is None else out + bias


def pad(input, pad, mode="constant", value=None):
    """torch.nn.functional.pad: ``pad`` = (left, right, top, bottom, ...) from the last dim."""
    if len(pad) % 2 or len(pad) // 2 > input.ndim:
        raise RuntimeError(f"pad: padding length {len(pad)} must be even and at most "
                           f"2 * ndim ({input.ndim})")
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    if mode == "constant":
        return S.pad_constant.apply(input, pad=widths, value=0.0 if value is None else value)
    if mode not in ("reflect", "replicate", "circular"):
        raise NotImplementedError(f"pad: mode {mode!r} is not supported")
    out = input
    for d, (b, a) in enumerate(widths):  # an integer index along each padded dim
        if b == 0 and a == 0:
            continue
        n = input.shape[d]
        i = np.arange(-b, n + a)
        if mode == "reflect":
            if b >= n or a >= n:
                raise RuntimeError(f"pad: reflect padding ({b}, {a}) must be smaller than the "
                                   f"dimension size {n}")
            i = np.abs(i)
            i = np.where(i >= n, 2 * (n - 1) - i, i)
        elif mode == "replicate":
            i = np.clip(i, 0, n - 1)
        else:
            i = i % n
        out = fn.index_select(out, d, Tensor._make(out.device.xp.asarray(i), out.device))
    return out


def one_hot(tensor, num_classes=-1):
    if tensor.dtype.kind not in "iu":
        raise RuntimeError("one_hot is only applicable to index tensor")
    xp = tensor.device.xp
    a = tensor.array
    if num_classes < 0:
        num_classes = int(a.max()) + 1 if a.size else 0
    if a.size and (int(a.min()) < 0 or int(a.max()) >= num_classes):
        raise RuntimeError(f"one_hot: class values must be in [0, {num_classes})")
    out = (a[..., None] == xp.arange(num_classes)).astype(np.int64)
    return Tensor._make(out, tensor.device)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if tuple(input.shape[-len(normalized_shape):]) != normalized_shape:
        raise RuntimeError(f"layer_norm: expected input with shape [*, "
                           f"{', '.join(map(str, normalized_shape))}], but got input of size "
                           f"{list(input.shape)}")
    dims = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    mu = input.mean(dim=dims, keepdim=True)
    d = input - mu
    var = (d * d).mean(dim=dims, keepdim=True)
    out = d * (var + eps).rsqrt()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def normalize(input, p=2.0, dim=1, eps=1e-12):
    n = (input.abs() ** p).sum(dim=dim, keepdim=True) ** (1.0 / p)
    return input / n.clamp(min=eps)


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    n = (x1 * x1).sum(dim).sqrt().clamp(min=eps) * (x2 * x2).sum(dim).sqrt().clamp(min=eps)
    return (x1 * x2).sum(dim) / n


# ---- losses ---------------------------------------------------------------------------
def _reduce(loss, reduction, name):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{name}: {reduction!r} is not a valid value for reduction "
                     f"('none', 'mean', 'sum')")


def _same_shape(name, input, target):
    if input.shape != target.shape:
        raise ValueError(f"{name}: target size {tuple(target.shape)} must be the same as "
                         f"input size {tuple(input.shape)}")


def _class_targets(name, input, target):
    """Check (N, C, d1...) input vs (N, d1...) integer targets."""
    if target.dtype.kind not in "iu":
        raise RuntimeError(f"{name}: expected an integer (class index) target, got "
                           f"{target.dtype}")
    exp = (input.shape[0],) + tuple(input.shape[2:]) if input.ndim >= 2 else ()
    if tuple(target.shape) != exp:
        raise ValueError(f"{name}: expected target of shape {exp} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")


def _rows(input, target):
    """(N, C, d1..) logits and (N, d1..) targets -> (M, C) rows and (M,) targets."""
    if input.ndim == 1:
        return input.unsqueeze(0), target.reshape(1)
    if input.ndim == 2:
        return input, target
    c = input.shape[1]
    return input.movedim(1, -1).reshape(-1, c), target.reshape(-1)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy of logits (N, C[, d1...]) with class indices (N[, d1...]) or class
    probabilities (same shape as input); fused kernel for the class-index case."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    if target.dtype.kind == "f":  # probabilities
        _same_shape("cross_entropy", input, target)
        c = input.shape[1] if input.ndim > 1 else input.shape[0]
        cdim = 1 if input.ndim > 1 else 0
        t = target * (1 - label_smoothing) + label_smoothing / c
        logp = input.log_softmax(cdim)
        w = 1 if weight is None else weight.reshape((c,) + (1,) * (input.ndim - cdim - 1))
        loss = -(logp * t * w).sum(cdim)
        if reduction == "mean":
            return loss.sum() / (loss.numel() if input.ndim > 1 else 1)
        return _reduce(loss, reduction, "cross_entropy")
    if input.ndim == 1:
        input, target, squeeze = input.unsqueeze(0), target.reshape(1), True
    else:
        squeeze = False
    _class_targets("cross_entropy", input, target)
    rows, t = _rows(input, target)
    if weight is not None and weight.shape != (rows.shape[1],):
        raise RuntimeError(f"cross_entropy: weight should have shape ({rows.shape[1]},), got "
                           f"{tuple(weight.shape)}")
    _check_target_range("cross_entropy", t, rows.shape[1], ignore_index)
    losses = N.cross_entropy_fused.apply(rows, t, weight, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing)
    if reduction == "none":
        out = losses.reshape(target.shape)
        return out.reshape(()) if squeeze else out
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / _weight_total(rows, t, weight, ignore_index)


def _check_target_range(name, t, c, ignore_index):
    a = t.array
    if a.size:
        bad = (a != ignore_index) & ((a < 0) | (a >= c))
        if bool(bad.any()):
            raise IndexError(f"{name}: target {int(a[bad][0])} is out of bounds for {c} "
                             f"classes")


def _weight_total(rows, t, weight, ignore_index):
    """Mean reduction's denominator: the summed weights of the non-ignored targets."""
    xp = rows.device.xp
    valid = t.array != ignore_index
    if weight is None:
        total = valid.sum()
    else:
        total = (weight.array[xp.where(valid, t.array, 0)] * valid).sum()
    return Tensor._make(xp.asarray(total, dtype=rows.dtype), rows.device)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """Negative log-likelihood of log-probabilities (N, C[, d1...]) at class indices."""
    squeeze = input.ndim == 1
    if squeeze:
        input, target = input.unsqueeze(0), target.reshape(1)
    _class_targets("nll_loss", input, target)
    rows, t = _rows(input, target)
    c = rows.shape[1]
    _check_target_range("nll_loss", t, c, ignore_index)
    valid = t != ignore_index
    safe = t.masked_fill(valid.logical_not(), 0)
    picked = rows.gather(1, safe.unsqueeze(1)).squeeze(1)          # (M,)
    w = valid.to(rows.dtype) if weight is None else weight[safe] * valid.to(rows.dtype)
    losses = -picked * w
    if reduction == "none":
        out = losses.reshape(target.shape)
        return out.reshape(()) if squeeze else out
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / w.sum()


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    _same_shape("mse_loss", input, target)
    d = input - target
    return _reduce(d * d, reduction, "mse_loss")


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    _same_shape("l1_loss", input, target)
    return _reduce((input - target).abs(), reduction, "l1_loss")


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    _same_shape("smooth_l1_loss", input, target)
    d = (input - target).abs()
    if beta == 0:
        return _reduce(d, reduction, "smooth_l1_loss")
    loss = fn.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return _reduce(loss, reduction, "smooth_l1_loss")


def huber_loss(input, target, reduction="mean", delta=1.0):
    _same_shape("huber_loss", input, target)
    d = (input - target).abs()
    loss = fn.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta))
    return _reduce(loss, reduction, "huber_loss")


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    _same_shape("binary_cross_entropy", input, target)
    a = input.array
    if a.size and bool(((a < 0) | (a > 1)).any()):
        raise RuntimeError("binary_cross_entropy: all elements of input should be between "
                           "0 and 1")
    # torch clamps the logs at -100 so that 0 * log(0) stays finite
    loss = -(target * input.log().clamp(min=-100) + (1 - target) *
             (1 - input).log().clamp(min=-100))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy")


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None):
    """Stable: (1 - y) x + (1 + (pw - 1) y) * (log(1 + exp(-|x|)) + max(-x, 0))."""
    _same_shape("binary_cross_entropy_with_logits", input, target)
    log_sig_neg = (-input.abs()).exp().log1p() + (-input).clamp(min=0)   # -log sigmoid(x)
    if pos_weight is not None:
        lw = 1 + (pos_weight - 1) * target
        loss = (1 - target) * input + lw * log_sig_neg
    else:
        loss = (1 - target) * input + log_sig_neg
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None,
                      reduce=None, reduction="mean"):
    """The multi-class SVM (hinge) loss: sum_{j != y} max(0, margin - x_y + x_j)^p / C."""
    if p not in (1, 2):
        raise ValueError("multi_margin_loss: only p == 1 and p == 2 supported")
    squeeze = input.ndim == 1
    if squeeze:
        input, target = input.unsqueeze(0), target.reshape(1)
    _class_targets("multi_margin_loss", input, target)
    c = input.shape[1]
    _check_target_range("multi_margin_loss", target, c, -(10 ** 9))
    xy = input.gather(1, target.unsqueeze(1))                     # (N, 1)
    m = (input - xy + margin).clamp(min=0)
    if p == 2:
        m = m * m
    if weight is not None:
        m = m * weight[target].unsqueeze(1)
    notself = 1 - one_hot(target, c).to(input.dtype)             # skip j == y
    loss = (m * notself).sum(1) / c
    if squeeze and reduction == "none":
        return loss.reshape(())
    return _reduce(loss, reduction, "multi_margin_loss")


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """KL(target || exp(input)) pointwise; ``input`` holds log-probabilities."""
    if log_target:
        loss = target.exp() * (target - input)
    else:
        safe = fn.where(target > 0, target, target.new_ones(target.shape))
        loss = fn.where(target > 0, target * (safe.log() - input), target * 0)
    if reduction == "batchmean":
        return loss.sum() / input.shape[0]
    return _reduce(loss, reduction, "kl_div")


# ---- CNN ops (gpudiff/ops/conv.py, pool.py, norm.py) ------------------------------------
try:
    from ..ops.conv import conv2d, conv_transpose2d  # noqa: F401
except ImportError:
    pass
try:
    from ..ops.pool import (max_pool2d, avg_pool2d, adaptive_avg_pool2d,  # noqa: F401
                            adaptive_max_pool2d)
except ImportError:
    pass
try:
    from ..ops.norm import batch_norm, dropout, dropout2d, interpolate  # noqa: F401
except ImportError:
    pass


# ---- embedding (added by the nn engineer; see gpudiff/nn/modules/sparse.py) -------------
class _ScaleGrad:
    """Identity forward; backward multiplies the gradient by a constant ``scale`` array
    (0 on Embedding's padding row lookups, 1 / count with scale_grad_by_freq)."""

    _fn = None

    @classmethod
    def apply(cls, x, scale):
        if cls._fn is None:
            from ..autograd import Function

            class ScaleGrad(Function):
                @staticmethod
                def forward(ctx, x, scale):
                    ctx.scale = scale
                    return x

                @staticmethod
                def backward(ctx, gy):
                    return gy * ctx.scale, None
            cls._fn = ScaleGrad
        return cls._fn.apply(x, scale)


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """Rows of ``weight`` (V, D) at integer ids ``input`` (*): output (*, D).

    The gradient scatter-adds into the looked-up rows (repeated ids accumulate); the
    ``padding_idx`` row gets none. ``max_norm`` renormalises the looked-up rows in place
    (outside the graph), as PyTorch does.
    """
    if input.dtype.kind not in "iu":
        raise RuntimeError(f"Expected tensor for argument #1 'indices' to have one of the "
                           f"following scalar types: Long, Int; but got {input.dtype} instead")
    if weight.ndim != 2:
        raise RuntimeError(f"embedding: 'weight' must be 2-D, got shape {tuple(weight.shape)}")
    v = weight.shape[0]
    if padding_idx is not None:
        if padding_idx > 0 and padding_idx >= v or padding_idx < -v:
            raise AssertionError("Padding_idx must be within num_embeddings")
        padding_idx = padding_idx % v
    a = input.array
    if a.size and (int(a.min()) < 0 or int(a.max()) >= v):
        raise IndexError(f"embedding: index out of range in self (ids must be in [0, {v}), "
                         f"got min {int(a.min())}, max {int(a.max())})")
    xp = weight.device.xp
    if max_norm is not None:
        rows = xp.unique(a)
        w = weight.array
        norms = (xp.abs(w[rows]) ** norm_type).sum(axis=1) ** (1.0 / norm_type)
        big = norms > max_norm
        if bool(big.any()):
            scale = (max_norm / (norms[big] + 1e-7)).astype(w.dtype)
            w[rows[big]] *= scale[:, None]
            weight._version[0] += 1
    out = weight[input]
    if weight.requires_grad and (padding_idx is not None or scale_grad_by_freq):
        s = xp.ones(a.shape, dtype=weight.dtype)
        if scale_grad_by_freq:
            _, inverse, counts = xp.unique(a, return_inverse=True, return_counts=True)
            s = s / counts[inverse.reshape(a.shape)].astype(weight.dtype)
        if padding_idx is not None:
            s = xp.where(a == padding_idx, xp.zeros((), dtype=weight.dtype), s)
        out = _ScaleGrad.apply(out, Tensor._make(s[..., None], weight.device))
    return out
