"""2-D convolution and transposed convolution (NCHW), forward and backward.

Three primitive ops, each the others' gradient, so double backward works (the public
functions conv2d / conv_transpose2d are in gpudiff/nn/functional.py):

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
from ..geometry import ConvGeom, conv_output_size
from . import Op, forward_of
from .lowp import compute_in_float32, sum32, upcast_ref


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
class conv2d(Op):
    """y = conv2d(x (N, C, H, W), w (K, C/G, kh, kw), b (K,) | None); pairs for geometry."""


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
        gx = conv2d_backward_input.apply(gy, w, input_size=x.shape, **ctx.p) if nx else None
        gw = conv2d_backward_weight.apply(gy, x, weight_size=w.shape, **ctx.p) if nw else None
        gb = gy.sum((0, 2, 3)) if nb else None
        return gx, gw, gb

    def backward_arrays(ctx, gy):
        x, w = ctx.saved_arrays
        nx, nw, nb = ctx.needs_input_grad
        gx = forward_of(conv2d_backward_input, ctx, gy, w, input_size=x.shape, **ctx.p) \
            if nx else None
        gw = forward_of(conv2d_backward_weight, ctx, gy, x, weight_size=w.shape, **ctx.p) \
            if nw else None
        return gx, gw, sum32(gy, (0, 2, 3)) if nb else None


class conv2d_backward_input(Op):
    """gx (input_size) of y = conv2d(x, w) given gy; linear in gy and in w."""


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
        g_gy = conv2d.apply(ggx, w, None, **ctx.p) if ngy else None
        g_w = conv2d_backward_weight.apply(gy, ggx, weight_size=w.shape, **ctx.p) if nw else None
        return g_gy, g_w


class conv2d_backward_weight(Op):
    """gw (weight_size) of y = conv2d(x, w) given gy; linear in gy and in x."""


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
        g_gy = conv2d.apply(x, ggw, None, **ctx.p) if ngy else None
        g_x = conv2d_backward_input.apply(gy, ggw, input_size=x.shape, **ctx.p) if nx else None
        return g_gy, g_x


# float16 / bfloat16: in float32 on the CPU; on CUDA the kernels take them (tensor cores)
compute_in_float32(conv2d, conv2d_backward_input, conv2d_backward_weight, native_cuda=True)
conv2d_ref = upcast_ref(conv2d_ref)
conv2d_backward_input_ref = upcast_ref(conv2d_backward_input_ref)
conv2d_backward_weight_ref = upcast_ref(conv2d_backward_weight_ref)
