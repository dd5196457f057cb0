"""gpudiff.nn.functional (as ``F``): every function of torch.nn.functional that gpudiff has.

Each checks its arguments the way PyTorch does (errors name the function, the argument and
the shapes) and calls primitive ops from gpudiff.ops; composite ones (gelu, the losses) are
written in tensor functions, so their gradients come for free.
"""
import math

import numpy as np

from .. import functions as _fn
from .. import runtime as _runtime
from ..runtime import autocast as _autocast
from ..runtime import capture as _capture
from ..functions import log_softmax, softmax  # noqa: F401
from ..geometry import conv_output_size as _conv_output_size
from ..geometry import pair as _pair
from ..geometry import pool_output_size as _pool_output_size
from ..ops import activation as _act
from ..ops import conv as _conv
from ..ops import dropout as _drop
from ..ops import interpolate as _interp
from ..ops import linalg as _linalg
from ..ops import norm as _norm
from ..ops import pool as _pool
from ..ops import shape as _shape
from ..ops import softmax as _softmax
from ..tensor import Tensor as _Tensor

sigmoid = _fn.sigmoid
tanh = _fn.tanh
flatten = _fn.flatten



def _autocast_inputs(name, *tensors):
    """The tensors cast by autocast's policy for the function ``name`` (functions written in
    several ops are cast once, at their entry, as PyTorch's lists name them)."""
    return _autocast.cast_inputs(name, tensors) if _autocast.state is not None else tensors

# ---- activations ----------------------------------------------------------------------
# inplace=True passes a function to _Tensor._inplace: the op then runs on a stand-in copy, so
# the input it saves for backward is not the buffer the in-place write overwrites
def relu(input, inplace=False):
    return input._inplace(_act.relu.apply) if inplace else _act.relu.apply(input)


def relu6(input, inplace=False):
    return hardtanh(input, 0.0, 6.0, inplace)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    def f(x):
        return _act.leaky_relu.apply(x, negative_slope=negative_slope)
    return input._inplace(f) if inplace else f(input)


def elu(input, alpha=1.0, inplace=False):
    def f(x):
        return _act.elu.apply(x, alpha=alpha)
    return input._inplace(f) if inplace else f(input)


def gelu(input, approximate="none"):
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * input * (1 + (c * (input + 0.044715 * input ** 3)).tanh())
    return 0.5 * input * (1 + _fn.erf(input * (1 / math.sqrt(2.0))))


def silu(input, inplace=False):
    def f(x):
        return x * x.sigmoid()
    return input._inplace(f) if inplace else f(input)


def softplus(input, beta=1.0, threshold=20.0):
    return _act.softplus.apply(input, beta=beta, threshold=threshold)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    def f(x):
        return x.clamp(min_val, max_val)
    return input._inplace(f) if inplace else f(input)


def logsigmoid(input):
    return -softplus(-input)


def softmin(input, dim=None):
    input, = _autocast_inputs("softmin", input)
    return softmax(-input, dim)


# ---- linear, padding, encoding ---------------------------------------------------------
def linear(input, weight, bias=None):
    """y = x W^T + b. input (..., in), weight (out, in), bias (out,)."""
    input, weight, bias = _autocast_inputs("linear", input, weight, bias)
    if input.shape[-1] != weight.shape[-1]:
        raise RuntimeError(f"linear: input shape {tuple(input.shape)} and weight shape "
                           f"{tuple(weight.shape)} do not align ({input.shape[-1]} != "
                           f"{weight.shape[-1]}): mat1 and mat2 shapes cannot be multiplied")
    if input.ndim == 0 or weight.ndim != 2:
        raise RuntimeError(f"linear: expected an input of at least 1 dimension and a 2-D "
                           f"weight, got shapes {tuple(input.shape)} and {tuple(weight.shape)}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise RuntimeError(f"linear: expected input, weight and bias of one dtype, got "
                           f"{input.dtype}, {weight.dtype}"
                           + ("" if bias is None else f" and {bias.dtype}"))
    if bias is not None and tuple(bias.shape) != weight.shape[:1]:
        raise RuntimeError(f"linear: expected bias of shape {weight.shape[:1]}, got "
                           f"{tuple(bias.shape)}")
    return _linalg.linear.apply(input, weight, bias)


def bilinear(input1, input2, weight, bias=None):
    # weight (out, in1, in2): y_k = x1^T W_k x2 + b_k
    out = _fn.stack([((input1 @ w) * input2).sum(-1) for w in weight], -1)
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
        return _shape.pad_constant.apply(input, pad=widths, value=0.0 if value is None else value)
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
        out = _fn.index_select(out, d, _Tensor.from_array(out.device.xp.asarray(i), out.device))
    return out


def _ids_in_range(a, v):
    if a.size and (int(a.min()) < 0 or int(a.max()) >= v):
        raise IndexError(f"embedding: index out of range in self (ids must be in [0, {v}), "
                         f"got min {int(a.min())}, max {int(a.max())})")


def one_hot(tensor, num_classes=-1):
    if tensor.dtype.kind not in "iu":
        raise RuntimeError("one_hot is only applicable to index tensor")
    xp = tensor.device.xp
    a = tensor.array
    if num_classes < 0:
        _capture.check_shape_known("one_hot without num_classes")
        num_classes = int(a.max()) + 1 if a.size else 0
    if a.size and (int(a.min()) < 0 or int(a.max()) >= num_classes):
        raise RuntimeError(f"one_hot: class values must be in [0, {num_classes})")
    out = (a[..., None] == xp.arange(num_classes)).astype(np.int64)
    return _Tensor.from_array(out, tensor.device)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    input, weight, bias = _autocast_inputs("layer_norm", input, weight, bias)
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
    input, = _autocast_inputs("normalize", input)
    n = (input.abs() ** p).sum(dim=dim, keepdim=True) ** (1.0 / p)
    return input / n.clamp(min=eps)


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    x1, x2 = _autocast_inputs("cosine_similarity", x1, x2)
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
    input, target, weight = _autocast_inputs("cross_entropy", input, target, weight)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    if _runtime.is_floating(target.dtype):  # probabilities
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
    losses = _softmax.cross_entropy.apply(rows, t, weight, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing)
    if reduction == "none":
        out = losses.reshape(target.shape)
        return out.reshape(()) if squeeze else out
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / _weight_total(rows, t, weight, ignore_index)


def _check_target_range(name, t, c, ignore_index):
    _capture.host_check(_target_range, name, t.array, c, ignore_index)


def _target_range(name, a, c, ignore_index):
    if a.size and (a.min() < 0 or a.max() >= c):  # (the common case: two reductions)
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
    return _Tensor.from_array(xp.asarray(total, dtype=rows.dtype), rows.device)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """Negative log-likelihood of log-probabilities (N, C[, d1...]) at class indices."""
    input, target, weight = _autocast_inputs("nll_loss", input, target, weight)
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
    input, target = _autocast_inputs("mse_loss", input, target)
    _same_shape("mse_loss", input, target)
    d = input - target
    return _reduce(d * d, reduction, "mse_loss")


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    input, target = _autocast_inputs("l1_loss", input, target)
    _same_shape("l1_loss", input, target)
    return _reduce((input - target).abs(), reduction, "l1_loss")


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    input, target = _autocast_inputs("smooth_l1_loss", input, target)
    _same_shape("smooth_l1_loss", input, target)
    d = (input - target).abs()
    if beta == 0:
        return _reduce(d, reduction, "smooth_l1_loss")
    loss = _fn.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return _reduce(loss, reduction, "smooth_l1_loss")


def huber_loss(input, target, reduction="mean", delta=1.0):
    input, target = _autocast_inputs("huber_loss", input, target)
    _same_shape("huber_loss", input, target)
    d = (input - target).abs()
    loss = _fn.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta))
    return _reduce(loss, reduction, "huber_loss")


def _probabilities(a):
    if a.size and bool(((a < 0) | (a > 1)).any()):
        raise RuntimeError("binary_cross_entropy: all elements of input should be between "
                           "0 and 1")


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    input, target, weight = _autocast_inputs("binary_cross_entropy", input, target,
                                             weight)
    _same_shape("binary_cross_entropy", input, target)
    _capture.host_check(_probabilities, input.array)
    # torch clamps the logs at -100 so that 0 * log(0) stays finite
    loss = -(target * input.log().clamp(min=-100) + (1 - target) *
             (1 - input).log().clamp(min=-100))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy")


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None):
    """Stable: (1 - y) x + (1 + (pw - 1) y) * (log(1 + exp(-|x|)) + max(-x, 0))."""
    input, target, weight, pos_weight = _autocast_inputs(
        "binary_cross_entropy_with_logits", input, target, weight, pos_weight)
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
    input, weight = _autocast_inputs("multi_margin_loss", input, weight)
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
    input, target = _autocast_inputs("kl_div", input, target)
    if log_target:
        loss = target.exp() * (target - input)
    else:
        safe = _fn.where(target > 0, target, target.new_ones(target.shape))
        loss = _fn.where(target > 0, target * (safe.log() - input), target * 0)
    if reduction == "batchmean":
        return loss.sum() / input.shape[0]
    return _reduce(loss, reduction, "kl_div")


# ---- convolution and pooling ----------------------------------------------------------
def _check_conv_args(name, input, weight, bias, groups):
    if weight.ndim != 4:
        raise RuntimeError(f"{name}: expected a 4-D weight, got shape {tuple(weight.shape)}")
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{name}: expected a 3-D (unbatched) or 4-D (batched) input, got "
                           f"shape {tuple(input.shape)}")
    if groups < 1:
        raise RuntimeError(f"{name}: non-positive groups is not supported (got {groups})")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        raise RuntimeError(f"{name}: input type ({input.dtype}) and weight type "
                           f"({weight.dtype}) should be the same"
                           + ("" if bias is None else f" (bias: {bias.dtype})"))
    if not _runtime.is_floating(input.dtype):
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")


def _same_padding(name, kernel, stride, dilation):
    """'same': the total padding d*(k-1) per dim, split left = total // 2, right = rest."""
    if stride != (1, 1):
        raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    left = tuple(t // 2 for t in total)
    extra = tuple(t - 2 * lo for t, lo in zip(total, left))  # 0 or 1 more on the right
    return left, extra


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution over an (N, C, H, W) or unbatched (C, H, W) input, as
    torch.nn.functional.conv2d.

    ``padding`` is an int, an (h, w) pair, or 'valid' / 'same' ('same' with an even
    effective kernel pads one more on the bottom/right, as PyTorch does).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.conv2d(gpudiff.ones(1, 1, 4, 4), gpudiff.ones(1, 1, 3, 3)).shape
    (1, 1, 2, 2)
    """
    input, weight, bias = _autocast_inputs("conv2d", input, weight, bias)
    name = "conv2d"
    _check_conv_args(name, input, weight, bias, groups)
    stride = _pair(stride, name, "stride")
    dilation = _pair(dilation, name, "dilation")
    unbatched = input.ndim == 3
    if unbatched:
        input = input.unsqueeze(0)
    _, C, H, W = input.shape
    K, Cg, kh, kw = weight.shape
    if C != Cg * groups:
        raise RuntimeError(f"{name}: Given groups={groups}, weight of size {list(weight.shape)}, "
                           f"expected input{list(input.shape)} to have {Cg * groups} channels, "
                           f"but got {C} channels instead")
    if K % groups:
        raise RuntimeError(f"{name}: out_channels ({K}) must be divisible by groups ({groups})")
    if bias is not None and tuple(bias.shape) != (K,):
        raise RuntimeError(f"{name}: expected bias of shape ({K},), got {tuple(bias.shape)}")
    if min(stride) < 1 or min(dilation) < 1:
        raise RuntimeError(f"{name}: stride and dilation must be positive, got stride={stride}, "
                           f"dilation={dilation}")
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding, extra = _same_padding(name, (kh, kw), stride, dilation)
            if any(extra):  # even kernel: the odd pixel of padding goes bottom/right
                input = pad(input, (0, extra[1], 0, extra[0]))
                H, W = input.shape[2:]
        else:
            raise ValueError(f"{name}: invalid padding string {padding!r}, should be one of "
                             f"'valid', 'same'")
    else:
        padding = _pair(padding, name, "padding")
        if min(padding) < 0:
            raise RuntimeError(f"{name}: negative padding is not supported, got {padding}")
    OH = _conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    OW = _conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"{name}: Calculated output size: ({K}x{OH}x{OW}). Output size is too small "
            f"(input {tuple(input.shape)}, kernel {(kh, kw)}, stride {stride}, padding {padding}, "
            f"dilation {dilation})")
    y = _conv.conv2d.apply(input, weight, bias, stride=stride, padding=padding,
                       dilation=dilation, groups=int(groups))
    return y.squeeze(0) if unbatched else y


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """Transposed 2-D convolution (the gradient of conv2d with respect to its input), as
    torch.nn.functional.conv_transpose2d; weight is (C_in, C_out/groups, kh, kw).

    Output size: (H - 1)*stride - 2*padding + dilation*(kernel - 1) + output_padding + 1.

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.conv_transpose2d(gpudiff.ones(1, 1, 2, 2), gpudiff.ones(1, 1, 3, 3), stride=2).shape
    (1, 1, 5, 5)
    """
    input, weight, bias = _autocast_inputs("conv_transpose2d", input, weight, bias)
    name = "conv_transpose2d"
    _check_conv_args(name, input, weight, bias, groups)
    stride = _pair(stride, name, "stride")
    padding = _pair(padding, name, "padding")
    output_padding = _pair(output_padding, name, "output_padding")
    dilation = _pair(dilation, name, "dilation")
    unbatched = input.ndim == 3
    if unbatched:
        input = input.unsqueeze(0)
    N, C, H, W = input.shape
    Cin, Kg, kh, kw = weight.shape
    if C != Cin:
        raise RuntimeError(f"{name}: Given transposed=1, weight of size {list(weight.shape)}, "
                           f"expected input{list(input.shape)} to have {Cin} channels, but got "
                           f"{C} channels instead")
    if Cin % groups:
        raise RuntimeError(f"{name}: in_channels ({Cin}) must be divisible by groups ({groups})")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(output_padding) < 0:
        raise RuntimeError(f"{name}: stride and dilation must be positive and padding "
                           f"non-negative")
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= s and op_ >= d:
            raise RuntimeError(f"{name}: output padding must be smaller than either stride or "
                               f"dilation, but got output_padding={output_padding}, "
                               f"stride={stride}, dilation={dilation}")
    OH = (H - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    OW = (W - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    K = Kg * groups
    if OH < 1 or OW < 1:
        raise RuntimeError(f"{name}: output size ({K}x{OH}x{OW}) is too small")
    if bias is not None and tuple(bias.shape) != (K,):
        raise RuntimeError(f"{name}: expected bias of shape ({K},), got {tuple(bias.shape)}")
    # the transposed conv is conv2d's input gradient: the input plays gy, the (N, K, OH, OW)
    # output plays x, and weight (C_in, C_out/G, kh, kw) is conv2d's (K', C'/G, kh, kw)
    if all(o < s for o, s in zip(output_padding, stride)):
        y = _conv.conv2d_backward_input.apply(input, weight, input_size=(N, K, OH, OW), stride=stride,
                                      padding=padding, dilation=dilation, groups=int(groups))
    else:
        # output_padding >= stride (allowed below the dilation): a conv2d of the (OH, OW)
        # output would have more than (H, W) positions. Compute the whole unpadded output,
        # (H-1)*s + d*(k-1) + 1 per dim, then cut the padding off and extend with zeros.
        full = [(n - 1) * s + d * (k - 1) + 1
                for n, s, d, k in zip((H, W), stride, dilation, (kh, kw))]
        y = _conv.conv2d_backward_input.apply(input, weight, input_size=(N, K, *full), stride=stride,
                                      padding=(0, 0), dilation=dilation, groups=int(groups))
        y = y[:, :, padding[0]: padding[0] + OH, padding[1]: padding[1] + OW]
        extra = (OH - y.shape[2], OW - y.shape[3])
        if any(extra):
            y = pad(y, (0, extra[1], 0, extra[0]))
    if bias is not None:
        y = y + bias.reshape(1, K, 1, 1)
    return y.squeeze(0) if unbatched else y


# ---- public functions (torch.nn.functional signatures) ---------------------------------
def _check_input(name, input):
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{name}: expected a 3-D (unbatched) or 4-D (batched) input, got "
                           f"shape {tuple(input.shape)}")
    if not _runtime.is_floating(input.dtype):
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")
    if min(input.shape[-2:]) < 1 or (input.ndim == 4 and input.shape[1] < 1):
        raise RuntimeError(f"{name}: expected non-empty spatial and channel dimensions, got "
                           f"input of shape {tuple(input.shape)}")


def _window(name, input, kernel_size, stride, padding, dilation, ceil_mode, effective):
    kernel = _pair(kernel_size, name, "kernel_size")
    stride = kernel if (stride is None or (isinstance(stride, (tuple, list)) and not stride)) \
        else _pair(stride, name, "stride")
    padding = _pair(padding, name, "padding")
    dilation = _pair(dilation, name, "dilation")
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1:
        raise RuntimeError(f"{name}: kernel_size, stride and dilation must be positive, got "
                           f"kernel_size={kernel}, stride={stride}, dilation={dilation}")
    for p, k, d in zip(padding, kernel, dilation):
        half = ((k - 1) * d + 1) // 2 if effective else k // 2
        if p < 0 or p > half:
            raise RuntimeError(f"{name}: pad should be at most half of "
                               f"{'effective ' if effective else ''}kernel size, but got "
                               f"pad={padding}, kernel_size={kernel} and dilation={dilation}")
    H, W = input.shape[-2:]
    OH = _pool_output_size(H, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    OW = _pool_output_size(W, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if OH < 1 or OW < 1:
        raise RuntimeError(f"{name}: Given input size: ({'x'.join(map(str, input.shape[-3:]))}). "
                           f"Calculated output size: ({input.shape[-3]}x{OH}x{OW}). Output size "
                           f"is too small")
    return kernel, stride, padding, dilation


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling, as torch.nn.functional.max_pool2d; with ``return_indices`` also the
    int64 flat (h * W + w) position of each maximum in its plane.

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.max_pool2d(gpudiff.arange(16.).reshape(1, 1, 4, 4), 2).tolist()
    [[[[5.0, 7.0], [13.0, 15.0]]]]
    """
    name = "max_pool2d"
    _check_input(name, input)
    kernel, stride, padding, dilation = _window(name, input, kernel_size, stride, padding,
                                                dilation, ceil_mode, effective=True)
    y, idx = _pool.max_pool2d.apply(input, kernel_size=kernel, stride=stride, padding=padding,
                               dilation=dilation, ceil_mode=bool(ceil_mode))
    return (y, idx) if return_indices else y


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """2-D average pooling, as torch.nn.functional.avg_pool2d.

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.avg_pool2d(gpudiff.arange(16.).reshape(1, 1, 4, 4), 2).tolist()
    [[[[2.5, 4.5], [10.5, 12.5]]]]
    """
    name = "avg_pool2d"
    _check_input(name, input)
    if divisor_override is not None and int(divisor_override) == 0:
        raise RuntimeError(f"{name}: divisor must be not zero")
    kernel, stride, padding, _ = _window(name, input, kernel_size, stride, padding, 1,
                                         ceil_mode, effective=False)
    return _pool.avg_pool2d.apply(input, kernel_size=kernel, stride=stride, padding=padding,
                             ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad),
                             divisor_override=None if divisor_override is None
                             else int(divisor_override))


def _adaptive_size(name, input, output_size):
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"{name}: output_size must be an int or a pair, got {output_size!r}")
        size = tuple(input.shape[-2 + i] if s is None else int(s)
                     for i, s in enumerate(output_size))
    else:
        size = (int(output_size), int(output_size))
    if min(size) < 1:
        raise RuntimeError(f"{name}: output_size must be positive, got {size}")
    return size


def adaptive_avg_pool2d(input, output_size):
    """Average over PyTorch's adaptive bins to an (oh, ow) output (None keeps that size).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.adaptive_avg_pool2d(gpudiff.ones(2, 3, 5, 7), (2, 3)).shape
    (2, 3, 2, 3)
    """
    name = "adaptive_avg_pool2d"
    _check_input(name, input)
    size = _adaptive_size(name, input, output_size)
    return _pool.adaptive_avg_pool2d.apply(input, output_size=size)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Max over PyTorch's adaptive bins (uneven where the sizes do not divide).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.adaptive_max_pool2d(gpudiff.arange(25.).reshape(1, 1, 5, 5), 2).tolist()
    [[[[12.0, 14.0], [22.0, 24.0]]]]
    """
    name = "adaptive_max_pool2d"
    _check_input(name, input)
    size = _adaptive_size(name, input, output_size)
    y, idx = _pool.adaptive_max_pool2d.apply(input, output_size=size)
    return (y, idx) if return_indices else y


# ---- batch norm ---
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over dim 1 of an (N, C) or (N, C, *) input, as
    torch.nn.functional.batch_norm (running statistics updated in place when training).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> x = gpudiff.tensor([[1.0, 2.0], [3.0, 6.0]])
    >>> [[round(v, 4) for v in row] for row in F.batch_norm(x, None, None, training=True).tolist()]
    [[-1.0, -1.0], [1.0, 1.0]]
    """
    name = "batch_norm"
    if input.ndim < 2:
        raise ValueError(f"{name}: expected an (N, C, *) input, got shape {tuple(input.shape)}")
    if not _runtime.is_floating(input.dtype):
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")
    C = input.shape[1]
    if training:
        if input.numel() // C == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(input.shape)}")
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif running_mean is None or running_var is None:
        raise RuntimeError(f"{name}: running_mean and running_var must be given in evaluation "
                           f"mode (training=False)")
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (C,):
            raise RuntimeError(f"{name}: expected {what} of shape ({C},), got {tuple(t.shape)}")
    y = _norm.batch_norm.apply(input, weight, bias, running_mean, running_var,
                          training=bool(training), momentum=float(momentum or 0.0),
                          eps=float(eps))
    if training:  # the buffers changed in place: tensors that saved them must notice
        for t in (running_mean, running_var):
            if t is not None:
                t.bump_version()
    return y




# ---- dropout ---
def _draw_seed():
    return int(_runtime.rng().integers(0, 2**63))


def _dropout(name, input, p, training, inplace, group):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if not _runtime.is_floating(input.dtype):
        raise RuntimeError(f"{name}: expected a floating input, got {input.dtype}")
    plan = _capture.recording()  # in a graph capture: a seed each replay draws anew
    seed = plan.device_seed(input.device, _draw_seed) if plan is not None else _draw_seed()
    out = _drop.dropout.apply(input, p=float(p), seed=seed, group=group)
    return input._inplace(out) if inplace else out


def dropout(input, p=0.5, training=True, inplace=False):
    """Zero each element with probability p and scale the rest by 1 / (1 - p), as
    torch.nn.functional.dropout (the input itself when not training or p == 0).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.dropout(gpudiff.ones(4), 0.5, training=False).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    return _dropout("dropout", input, p, training, inplace, 1)


def dropout2d(input, p=0.5, training=True, inplace=False):
    """Zero whole channels (dim 1 of an (N, C, *) input) with probability p, scaling the
    rest by 1 / (1 - p), as torch.nn.functional.dropout2d (a 3-D input is (N, C, L))."""
    if input.ndim not in (3, 4):
        import warnings
        warnings.warn(f"dropout2d: Received a {input.ndim}-D input to dropout2d, which is "
                      f"deprecated; dropout2d expects 3-D or 4-D inputs", stacklevel=2)
    group = int(np.prod(input.shape[2:], dtype=np.int64)) if input.ndim >= 2 else 1
    return _dropout("dropout2d", input, p, training, inplace, max(group, 1))




# ---- interpolate ---
def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    """Resample the spatial dims of an (N, C, *spatial) input; modes 'nearest' and
    'nearest-exact' (as torch.nn.functional.interpolate).

    >>> import gpudiff, gpudiff.nn.functional as F
    >>> F.interpolate(gpudiff.tensor([[[1.0, 2.0]]]), scale_factor=2).tolist()
    [[[1.0, 1.0, 2.0, 2.0]]]
    """
    name = "interpolate"
    if mode not in ("nearest", "nearest-exact"):
        raise NotImplementedError(f"{name}: mode {mode!r} is not supported (only 'nearest' and "
                                  f"'nearest-exact')")
    if align_corners is not None:
        raise ValueError("align_corners option can only be set with the interpolating modes: "
                         "linear | bilinear | bicubic | trilinear")
    if antialias:
        raise ValueError(f"{name}: anti-alias is not supported for mode {mode!r}")
    dim = input.ndim - 2
    if dim < 1:
        raise ValueError(f"{name}: expected an (N, C, *spatial) input, got shape "
                         f"{tuple(input.shape)}")
    if (size is None) == (scale_factor is None):
        raise ValueError("only one of size or scale_factor should be defined" if size is not None
                         else "either size or scale_factor should be defined")
    in_size = tuple(input.shape[2:])
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
        out = tuple(size) if isinstance(size, (tuple, list)) else (size,) * dim
        if len(out) != dim:
            raise ValueError(f"Input and output must have the same number of spatial dimensions,"
                             f" but got input with spatial dimensions of {list(in_size)} and "
                             f"output size of {size}.")
        out = tuple(int(s) for s in out)
        scales = (None,) * dim
    else:
        sf = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) \
            else (scale_factor,) * dim
        if len(sf) != dim:
            raise ValueError(f"Input and scale_factor must have the same number of spatial "
                             f"dimensions, but got input with spatial dimensions of "
                             f"{list(in_size)} and scale_factor of shape {scale_factor}.")
        out = tuple(math.floor(n * float(s)) for n, s in zip(in_size, sf))
        scales = (None,) * dim if recompute_scale_factor else tuple(float(s) for s in sf)
    if min(out) < 1:
        raise RuntimeError(f"{name}: output size {out} must be positive (input {in_size})")
    return _interp.interpolate.apply(input, output_size=out, scales=scales,
                               exact=mode == "nearest-exact")


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
    _capture.host_check(_ids_in_range, a, v)
    xp = weight.device.xp
    if max_norm is not None:
        rows = xp.unique(a)
        w = weight.array
        norms = (xp.abs(w[rows]) ** norm_type).sum(axis=1) ** (1.0 / norm_type)
        big = norms > max_norm
        if bool(big.any()):
            scale = (max_norm / (norms[big] + 1e-7)).astype(w.dtype)
            w[rows[big]] *= scale[:, None]
            weight.bump_version()
    out = weight[input]
    if weight.requires_grad and (padding_idx is not None or scale_grad_by_freq):
        s = xp.ones(a.shape, dtype=weight.dtype)
        if scale_grad_by_freq:
            _, inverse, counts = xp.unique(a, return_inverse=True, return_counts=True)
            s = s / counts[inverse.reshape(a.shape)].astype(weight.dtype)
        if padding_idx is not None:
            s = xp.where(a == padding_idx, xp.zeros((), dtype=weight.dtype), s)
        out = _ScaleGrad.apply(out, _Tensor.from_array(s[..., None], weight.device))
    return out
