"""2-D pooling (NCHW, or unbatched CHW): max, average, adaptive average, adaptive max.

Primitive ops (registry names in quotes) and their gradients:

  'max_pool2d'           (y, indices)   indices: int64 flat h*W + w of each max in its plane,
  'adaptive_max_pool2d'  (y, indices)     ties to the first tap, a NaN wins (as PyTorch)
  'max_pool2d_backward'  gx = scatter-add of gy at indices   (its own gradient: a gather)
  'avg_pool2d'  <->  'avg_pool2d_backward'                   (each the other's adjoint)
  'adaptive_avg_pool2d'  <->  'adaptive_avg_pool2d_backward'

Each forward asks the device for its kernel (``ctx.kernel``) and otherwise runs the xp
reference here. Output sizes are PyTorch's: floor((n + 2p - d(k-1) - 1) / s) + 1, or ceil
with the last window required to start inside the input or its left padding; adaptive bin
i of n_out over n covers [floor(i*n/n_out), ceil((i+1)*n/n_out)).
"""
import numpy as np

from ..geometry import pool_output_size
from . import Op, forward_of
from .lowp import compute_in_float32


def _as4d(xp_array):
    """(N, C, H, W) view of a 3-D or 4-D array and whether it was unbatched."""
    return (xp_array[None], True) if xp_array.ndim == 3 else (xp_array, False)


def _first_taps(n, out, k, s, p, d):
    """Per output position: the first tap inside [0, n) of its window (PyTorch's start)."""
    start = np.arange(out) * s - p
    first = np.where(start >= 0, 0, (-start + d - 1) // d)
    return start + first * d


def _bins(n, n_out):
    i = np.arange(n_out)
    return (i * n) // n_out, ((i + 1) * n + n_out - 1) // n_out


# ---- xp references --------------------------------------------------------------------
def max_pool2d_ref(xp, x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    """Running max over the kh*kw strided views of the -inf padded input."""
    x4, unbatched = _as4d(x)
    N, C, H, W = x4.shape
    OH, OW = pool_output_size(H, kh, sh, ph, dh, ceil_mode), pool_output_size(W, kw, sw, pw,
                                                                              dw, ceil_mode)
    need_h, need_w = (OH - 1) * sh + (kh - 1) * dh + 1, (OW - 1) * sw + (kw - 1) * dw + 1
    pad = ((0, 0), (0, 0), (ph, max(0, need_h - H - ph)), (pw, max(0, need_w - W - pw)))
    xpad = xp.pad(x4, pad, constant_values=-np.inf)
    y = xp.full((N, C, OH, OW), -np.inf, x.dtype)
    first = (_first_taps(H, OH, kh, sh, ph, dh)[:, None] * W
             + _first_taps(W, OW, kw, sw, pw, dw)[None, :])
    idx = xp.broadcast_to(xp.asarray(first, dtype=np.int64), (N, C, OH, OW)).copy()
    hs, ws = np.arange(OH) * sh - ph, np.arange(OW) * sw - pw
    for i in range(kh):
        for j in range(kw):
            v = xpad[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh,
                     j * dw: j * dw + sw * (OW - 1) + 1: sw]
            at = xp.asarray((hs[:, None] + i * dh) * W + ws[None, :] + j * dw, dtype=np.int64)
            take = (v > y) | xp.isnan(v)       # strict: ties keep the first tap
            y = xp.where(take, v, y)
            idx = xp.where(take, at, idx)
    return (y[0], idx[0]) if unbatched else (y, idx)


def max_pool2d_backward_ref(xp, gy, indices, H, W):
    """gx[plane, indices] += gy: a bincount over the flat (plane, h*W + w) positions."""
    lead = gy.shape[:-2]
    planes = int(np.prod(lead, dtype=np.int64))
    flat = (indices.reshape(planes, -1)
            + xp.arange(planes, dtype=np.int64)[:, None] * (H * W)).ravel()
    gx = xp.bincount(flat, weights=gy.reshape(-1), minlength=planes * H * W)
    return gx.astype(gy.dtype, copy=False).reshape(lead + (H, W))


def _avg_divisors(H, W, OH, OW, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    """(OH, OW) array of each window's divisor (0 for a window wholly in the padding)."""
    def axis(n, out, k, s, p):
        start = np.arange(out) * s - p
        end = np.minimum(start + k, n + p)
        size = end - start                      # window clipped to the padded input
        inside = np.minimum(end, n) - np.maximum(start, 0)
        return size, inside
    size_h, in_h = axis(H, OH, kh, sh, ph)
    size_w, in_w = axis(W, OW, kw, sw, pw)
    if divisor_override:
        div = np.full((OH, OW), float(divisor_override))
    elif count_include_pad:
        div = (size_h[:, None] * size_w[None, :]).astype(float)
    else:
        div = (in_h[:, None] * in_w[None, :]).astype(float)
    empty = (in_h[:, None] <= 0) | (in_w[None, :] <= 0)
    return np.where(empty, 0.0, div)


def _avg_pad(H, W, OH, OW, kh, kw, sh, sw, ph, pw):
    need_h, need_w = (OH - 1) * sh + kh, (OW - 1) * sw + kw
    return ((0, 0), (0, 0), (ph, max(0, need_h - H - ph)), (pw, max(0, need_w - W - pw)))


def avg_pool2d_ref(xp, x, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override):
    x4, unbatched = _as4d(x)
    N, C, H, W = x4.shape
    OH, OW = pool_output_size(H, kh, sh, ph, 1, ceil_mode), pool_output_size(W, kw, sw, pw, 1,
                                                                             ceil_mode)
    xpad = xp.pad(x4, _avg_pad(H, W, OH, OW, kh, kw, sh, sw, ph, pw))
    s = xp.zeros((N, C, OH, OW), x.dtype)
    for i in range(kh):
        for j in range(kw):
            s += xpad[:, :, i: i + sh * (OH - 1) + 1: sh, j: j + sw * (OW - 1) + 1: sw]
    div = _avg_divisors(H, W, OH, OW, kh, kw, sh, sw, ph, pw, count_include_pad,
                        divisor_override)
    scale = xp.asarray(np.where(div > 0, 1 / np.where(div > 0, div, 1), 0), dtype=x.dtype)
    y = s * scale
    return y[0] if unbatched else y


def avg_pool2d_backward_ref(xp, gy, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
                            divisor_override):
    gy4, unbatched = _as4d(gy)
    N, C, OH, OW = gy4.shape
    div = _avg_divisors(H, W, OH, OW, kh, kw, sh, sw, ph, pw, count_include_pad,
                        divisor_override)
    scale = xp.asarray(np.where(div > 0, 1 / np.where(div > 0, div, 1), 0), dtype=gy.dtype)
    g = gy4 * scale
    pad = _avg_pad(H, W, OH, OW, kh, kw, sh, sw, ph, pw)
    gxp = xp.zeros((N, C, H + pad[2][0] + pad[2][1], W + pad[3][0] + pad[3][1]), gy.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i: i + sh * (OH - 1) + 1: sh, j: j + sw * (OW - 1) + 1: sw] += g
    gx = xp.ascontiguousarray(gxp[:, :, ph: ph + H, pw: pw + W])
    return gx[0] if unbatched else gx


def _bin_matrix(xp, n, n_out, dtype):
    """(n_out, n): row i averages bin i, so y = Ph @ x @ Pw^T is the adaptive average."""
    start, end = _bins(n, n_out)
    pos = np.arange(n)
    m = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])) / (end - start)[:, None]
    return xp.asarray(m, dtype=dtype)


def adaptive_avg_pool2d_ref(xp, x, oh, ow):
    H, W = x.shape[-2:]
    return xp.matmul(xp.matmul(_bin_matrix(xp, H, oh, x.dtype), x),
                     _bin_matrix(xp, W, ow, x.dtype).T)


def adaptive_avg_pool2d_backward_ref(xp, gy, H, W):
    oh, ow = gy.shape[-2:]
    return xp.ascontiguousarray(xp.matmul(xp.matmul(_bin_matrix(xp, H, oh, gy.dtype).T, gy),
                                          _bin_matrix(xp, W, ow, gy.dtype)))


def adaptive_max_pool2d_ref(xp, x, oh, ow):
    H, W = x.shape[-2:]
    lead = x.shape[:-2]
    y = xp.empty(lead + (oh, ow), x.dtype)
    idx = xp.empty(lead + (oh, ow), np.int64)
    (h0s, h1s), (w0s, w1s) = _bins(H, oh), _bins(W, ow)
    for i in range(oh):
        h0, h1 = int(h0s[i]), int(h1s[i])
        for j in range(ow):
            w0, w1 = int(w0s[j]), int(w1s[j])
            win = x[..., h0:h1, w0:w1].reshape(lead + (-1,))
            a = xp.argmax(win, axis=-1)          # the first max (a NaN counts as the max)
            y[..., i, j] = xp.take_along_axis(win, a[..., None], axis=-1)[..., 0]
            idx[..., i, j] = (h0 + a // (w1 - w0)) * W + w0 + a % (w1 - w0)
    return y, idx


# ---- the ops --------------------------------------------------------------------------
class max_pool2d(Op):

    def forward(ctx, x, *, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.hw = x.shape[-2:]
        ctx.window = kernel_size + stride + padding + dilation
        args = kernel_size + stride + padding + dilation + (ceil_mode,)
        k = ctx.kernel("max_pool2d")
        out = k(x, *args) if k else None
        y, idx = max_pool2d_ref(ctx.xp, x, *args) if out is None else out
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        return y, idx

    def backward(ctx, gy, gidx):
        idx, = ctx.saved_tensors
        return max_pool2d_backward.apply(gy, idx, H=ctx.hw[0], W=ctx.hw[1], window=ctx.window)

    def backward_arrays(ctx, gy, gidx):
        idx, = ctx.saved_arrays
        return forward_of(max_pool2d_backward, ctx, gy, idx, H=ctx.hw[0], W=ctx.hw[1],
                          window=ctx.window)


class adaptive_max_pool2d(Op):

    def forward(ctx, x, *, output_size):
        ctx.hw = x.shape[-2:]
        k = ctx.kernel("adaptive_max_pool2d")
        out = k(x, *output_size) if k else None
        y, idx = adaptive_max_pool2d_ref(ctx.xp, x, *output_size) if out is None else out
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        return y, idx

    def backward(ctx, gy, gidx):
        idx, = ctx.saved_tensors
        return max_pool2d_backward.apply(gy, idx, H=ctx.hw[0], W=ctx.hw[1], window="adaptive")


class max_pool2d_backward(Op):
    """gx (.., H, W): gy routed to the saved argmax positions (summed where they repeat).

    ``window`` (kh, kw, sh, sw, ph, pw, dh, dw) or 'adaptive' lets a device gather instead of
    scatter (each input element visits only the outputs whose window can cover it: the CUDA
    kernels, deterministic without atomics); without it the contract's kernel is used."""


    def forward(ctx, gy, indices, *, H, W, window=None):
        ctx.save_for_backward(indices)
        gx = None
        if window == "adaptive":
            k = ctx.kernel("adaptive_max_pool2d_backward")
            gx = k(gy, indices, H, W) if k else None
        elif window is not None:
            k = ctx.kernel("max_pool2d_with_indices_backward")
            gx = k(gy, indices, H, W, *window) if k else None
        if gx is None:
            k = ctx.kernel("max_pool2d_backward")
            gx = k(gy, indices, H, W) if k else None
        return max_pool2d_backward_ref(ctx.xp, gy, indices, H, W) if gx is None else gx

    def backward(ctx, ggx):
        idx, = ctx.saved_tensors
        # the adjoint of a scatter-add is the gather at the same positions
        ggy = ggx.flatten(-2).gather(-1, idx.flatten(-2)).reshape(idx.shape)
        return ggy, None


class avg_pool2d(Op):

    def forward(ctx, x, *, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override):
        ctx.p = {"kernel_size": kernel_size, "stride": stride, "padding": padding,
                     "ceil_mode": ceil_mode, "count_include_pad": count_include_pad,
                     "divisor_override": divisor_override}
        ctx.hw = x.shape[-2:]
        args = kernel_size + stride + padding + (ceil_mode, count_include_pad, divisor_override)
        k = ctx.kernel("avg_pool2d")
        y = k(x, *args) if k else None
        return avg_pool2d_ref(ctx.xp, x, *args) if y is None else y

    def backward(ctx, gy):
        return avg_pool2d_backward.apply(gy, input_size=ctx.hw, **ctx.p)

    def backward_arrays(ctx, gy):
        return forward_of(avg_pool2d_backward, ctx, gy, input_size=ctx.hw, **ctx.p)


class avg_pool2d_backward(Op):

    def forward(ctx, gy, *, input_size, kernel_size, stride, padding, ceil_mode,
                count_include_pad, divisor_override):
        ctx.p = {"kernel_size": kernel_size, "stride": stride, "padding": padding,
                     "ceil_mode": ceil_mode, "count_include_pad": count_include_pad,
                     "divisor_override": divisor_override}
        args = tuple(input_size) + kernel_size + stride + padding + (
            ceil_mode, count_include_pad, divisor_override)
        k = ctx.kernel("avg_pool2d_backward")
        gx = k(gy, *args) if k else None
        return avg_pool2d_backward_ref(ctx.xp, gy, *args) if gx is None else gx

    def backward(ctx, ggx):
        return avg_pool2d.apply(ggx, **ctx.p)


class adaptive_avg_pool2d(Op):

    def forward(ctx, x, *, output_size):
        ctx.hw = x.shape[-2:]
        k = ctx.kernel("adaptive_avg_pool2d")
        y = k(x, *output_size) if k else None
        return adaptive_avg_pool2d_ref(ctx.xp, x, *output_size) if y is None else y

    def backward(ctx, gy):
        return adaptive_avg_pool2d_backward.apply(gy, input_size=ctx.hw)

    def backward_arrays(ctx, gy):
        return forward_of(adaptive_avg_pool2d_backward, ctx, gy, input_size=ctx.hw)


class adaptive_avg_pool2d_backward(Op):

    def forward(ctx, gy, *, input_size):
        ctx.out = gy.shape[-2:]
        k = ctx.kernel("adaptive_avg_pool2d_backward")
        gx = k(gy, *input_size) if k else None
        return adaptive_avg_pool2d_backward_ref(ctx.xp, gy, *input_size) if gx is None else gx

    def backward(ctx, ggx):
        return adaptive_avg_pool2d.apply(ggx, output_size=ctx.out)


compute_in_float32(max_pool2d, max_pool2d_backward, adaptive_max_pool2d, avg_pool2d,
                   avg_pool2d_backward, adaptive_avg_pool2d, adaptive_avg_pool2d_backward)
