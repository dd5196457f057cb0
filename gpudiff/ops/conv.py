"""2-D convolution and transposed convolution (NCHW), forward and backward.

Three primitive ops (registered as 'conv2d', 'conv2d_backward_input',
'conv2d_backward_weight'; the classes carry CamelCase names so that the public functions
below can have torch's names), each the others' gradient, so double backward works:

  conv2d(x, w, b)                  y  (N, K, OH, OW)
  conv2d_backward_input(gy, w)     gx (N, C, H, W)   = conv2d's vjp for x (col2im of W^T gy);
                                                       also conv_transpose2d's forward
  conv2d_backward_weight(gy, x)    gw (K, C/G, kh, kw) = conv2d's vjp for w

Each asks the device for its whole-op kernel first (the C++/BLAS path on the CPU, the CUDA
kernels on a GPU). The xp reference lowers the convolution to a GEMM over im2col columns:
with G groups, Rg = C/G*kh*kw rows of columns per group and Kg = K/G filters per group,

  cols (N, G, Rg, L)       L = OH*OW, from im2col (the device's kernel when it has one)
  y    (N, G, Kg, L)       = w (G, Kg, Rg) @ cols            (batched GEMM, channels first)
  gx   = col2im( w^T (G, Rg, Kg) @ gy (N, G, Kg, L) )
  gw   = sum_n gy (N, G, Kg, L) @ cols^T (N, G, L, Rg)

Output size: (H + 2p - d(k-1) - 1) // s + 1, as PyTorch (an error below 1).
"""
from ..geometry import ConvGeom, conv_output_size, pair
from . import Op


# ---- xp reference im2col / col2im -----------------------------------------------------
def im2col_ref(xp, x, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) -> cols (N, C*kh*kw, OH*OW): one strided slice per kernel tap."""
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((N, C, kh, kw, OH, OW), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh,
                                 j * dw: j * dw + sw * (OW - 1) + 1: sw]
    return cols.reshape(N, C * kh * kw, OH * OW)


def col2im_ref(xp, cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """The adjoint of im2col_ref: taps are added back into a zero (N, C, H, W)."""
    N = cols.shape[0]
    OH, OW = conv_output_size(H, kh, sh, ph, dh), conv_output_size(W, kw, sw, pw, dw)
    cols = cols.reshape(N, C, kh, kw, OH, OW)
    x = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            x[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh,
              j * dw: j * dw + sw * (OW - 1) + 1: sw] += cols[:, :, i, j]
    return x[:, :, ph: ph + H, pw: pw + W]


def _im2col(ctx, x, g):
    k = ctx.kernel("im2col")
    cols = k(x, *g.taps) if k else None
    return im2col_ref(ctx.xp, x, *g.taps) if cols is None else cols


def _col2im(ctx, cols, g):
    k = ctx.kernel("col2im")
    x = k(cols, g.C, g.H, g.W, *g.taps) if k else None
    if x is None:
        x = ctx.xp.ascontiguousarray(col2im_ref(ctx.xp, cols, g.C, g.H, g.W, *g.taps))
    return x


# ---- reference paths (xp + the device's im2col/col2im) ---------------------------------
def conv2d_ref(ctx, x, w, b, g):
    xp = ctx.xp
    cols = _im2col(ctx, x, g).reshape(g.N, g.G, g.Rg, g.L)
    y = xp.matmul(w.reshape(g.G, g.Kg, g.Rg), cols)            # (N, G, Kg, L)
    y = y.reshape(g.N, g.K, g.OH, g.OW)
    if b is not None:
        y += b.reshape(1, g.K, 1, 1)
    return y


def conv2d_backward_input_ref(ctx, gy, w, g):
    xp = ctx.xp
    wt = w.reshape(g.G, g.Kg, g.Rg).transpose(0, 2, 1)          # (G, Rg, Kg)
    gcols = xp.matmul(wt, gy.reshape(g.N, g.G, g.Kg, g.L))      # (N, G, Rg, L)
    return _col2im(ctx, gcols.reshape(g.N, g.G * g.Rg, g.L), g)


def conv2d_backward_weight_ref(ctx, gy, x, g):
    xp = ctx.xp
    cols = _im2col(ctx, x, g).reshape(g.N, g.G, g.Rg, g.L)
    gw = xp.matmul(gy.reshape(g.N, g.G, g.Kg, g.L), cols.transpose(0, 1, 3, 2)).sum(0)
    return gw.reshape(g.K, g.C // g.G, g.kh, g.kw)              # (G, Kg, Rg) -> w's shape


def _params(stride, padding, dilation, groups):
    return {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


# ---- the ops --------------------------------------------------------------------------
class Conv2dOp(Op):
    """y = conv2d(x (N, C, H, W), w (K, C/G, kh, kw), b (K,) | None); pairs for geometry."""

    name = "conv2d"

    def forward(ctx, x, w, b, *, stride, padding, dilation, groups):
        ctx.p = _params(stride, padding, dilation, groups)
        ctx.save_for_backward(x, w)
        k = ctx.kernel("conv2d")
        y = k(x, w, b, stride, padding, dilation, groups) if k else None
        if y is None:
            y = conv2d_ref(ctx, x, w, b, ConvGeom(x.shape, w.shape, stride, padding,
                                                    dilation, groups))
        return y

    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        gx = Conv2dBackwardInput.apply(gy, w, input_size=x.shape, **ctx.p) if nx else None
        gw = Conv2dBackwardWeight.apply(gy, x, weight_size=w.shape, **ctx.p) if nw else None
        gb = gy.sum((0, 2, 3)) if nb else None
        return gx, gw, gb


class Conv2dBackwardInput(Op):
    """gx (input_size) of y = conv2d(x, w) given gy; linear in gy and in w."""

    name = "conv2d_backward_input"

    def forward(ctx, gy, w, *, input_size, stride, padding, dilation, groups):
        ctx.p = _params(stride, padding, dilation, groups)
        ctx.save_for_backward(gy, w)
        input_size = tuple(input_size)
        k = ctx.kernel("conv2d_backward_input")
        gx = k(gy, w, input_size, stride, padding, dilation, groups) if k else None
        if gx is None:
            gx = conv2d_backward_input_ref(ctx, gy, w, ConvGeom(
                input_size, w.shape, stride, padding, dilation, groups))
        return gx

    def backward(ctx, ggx):
        gy, w = ctx.saved_tensors
        ngy, nw = ctx.needs_input_grad
        # <ggx, D(gy, w)> = <conv2d(ggx, w), gy>: the adjoint pairs with the forward conv
        g_gy = Conv2dOp.apply(ggx, w, None, **ctx.p) if ngy else None
        g_w = Conv2dBackwardWeight.apply(gy, ggx, weight_size=w.shape, **ctx.p) if nw else None
        return g_gy, g_w


class Conv2dBackwardWeight(Op):
    """gw (weight_size) of y = conv2d(x, w) given gy; linear in gy and in x."""

    name = "conv2d_backward_weight"

    def forward(ctx, gy, x, *, weight_size, stride, padding, dilation, groups):
        ctx.p = _params(stride, padding, dilation, groups)
        ctx.save_for_backward(gy, x)
        weight_size = tuple(weight_size)
        k = ctx.kernel("conv2d_backward_weight")
        gw = k(gy, x, weight_size, stride, padding, dilation, groups) if k else None
        if gw is None:
            gw = conv2d_backward_weight_ref(ctx, gy, x, ConvGeom(
                x.shape, weight_size, stride, padding, dilation, groups))
        return gw

    def backward(ctx, ggw):
        gy, x = ctx.saved_tensors
        ngy, nx = ctx.needs_input_grad
        g_gy = Conv2dOp.apply(x, ggw, None, **ctx.p) if ngy else None
        g_x = Conv2dBackwardInput.apply(gy, ggw, input_size=x.shape, **ctx.p) if nx else None
        return g_gy, g_x


# ---- public functions (torch.nn.functional signatures) ---------------------------------
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
    if input.dtype.kind != "f":
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
    name = "conv2d"
    _check_conv_args(name, input, weight, bias, groups)
    stride = pair(stride, name, "stride")
    dilation = pair(dilation, name, "dilation")
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
                from ..nn.functional import pad
                input = pad(input, (0, extra[1], 0, extra[0]))
                H, W = input.shape[2:]
        else:
            raise ValueError(f"{name}: invalid padding string {padding!r}, should be one of "
                             f"'valid', 'same'")
    else:
        padding = pair(padding, name, "padding")
        if min(padding) < 0:
            raise RuntimeError(f"{name}: negative padding is not supported, got {padding}")
    OH = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    OW = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"{name}: Calculated output size: ({K}x{OH}x{OW}). Output size is too small "
            f"(input {tuple(input.shape)}, kernel {(kh, kw)}, stride {stride}, padding {padding}, "
            f"dilation {dilation})")
    y = Conv2dOp.apply(input, weight, bias, stride=stride, padding=padding,
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
    name = "conv_transpose2d"
    _check_conv_args(name, input, weight, bias, groups)
    stride = pair(stride, name, "stride")
    padding = pair(padding, name, "padding")
    output_padding = pair(output_padding, name, "output_padding")
    dilation = pair(dilation, name, "dilation")
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
        y = Conv2dBackwardInput.apply(input, weight, input_size=(N, K, OH, OW), stride=stride,
                                      padding=padding, dilation=dilation, groups=int(groups))
    else:
        # output_padding >= stride (allowed below the dilation): a conv2d of the (OH, OW)
        # output would have more than (H, W) positions. Compute the whole unpadded output,
        # (H-1)*s + d*(k-1) + 1 per dim, then cut the padding off and extend with zeros.
        full = [(n - 1) * s + d * (k - 1) + 1
                for n, s, d, k in zip((H, W), stride, dilation, (kh, kw))]
        y = Conv2dBackwardInput.apply(input, weight, input_size=(N, K, *full), stride=stride,
                                      padding=(0, 0), dilation=dilation, groups=int(groups))
        y = y[:, :, padding[0]: padding[0] + OH, padding[1]: padding[1] + OW]
        extra = (OH - y.shape[2], OW - y.shape[3])
        if any(extra):
            from ..nn.functional import pad
            y = pad(y, (0, extra[1], 0, extra[0]))
    if bias is not None:
        y = y + bias.reshape(1, K, 1, 1)
    return y.squeeze(0) if unbatched else y
