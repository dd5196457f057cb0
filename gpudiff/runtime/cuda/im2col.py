"""im2col / col2im of csrc/cuda/im2col.cu: the contract's unfolding kernels, and the column
builders of the convolution's 'im2col' algorithm (conv.py).
"""


from ...geometry import ConvGeom
from ..kernels import register_kernel
from .launch import THREADS, array_module, ctype, grid_1d, i32, launch


# ---- used by the convolution's im2col algorithm -----------------------------------------------
def run_im2col(x, geom, t):
    """cols (n, C*KH*KW, OH*OW) of a contiguous x (n, C, H, W)."""
    xp = array_module(x)
    n = x.shape[0]
    if geom.pointwise():
        return x.reshape(n, geom.C, geom.H * geom.W)  # the columns are x itself
    cols = xp.empty((n, geom.C * geom.kh * geom.kw, geom.OH * geom.OW), x.dtype)
    g = geom
    launch("im2col.cu", f"im2col_kernel<{t}>", grid_1d(cols.size, x), THREADS,
           (x, cols) + i32(n, g.C, g.H, g.W, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
                            g.dh, g.dw))
    return cols


def run_col2im(cols, geom, t):
    """x (n, C, H, W) from contiguous cols (n, C*KH*KW, OH*OW), overlapping taps summed."""
    xp = array_module(cols)
    n = cols.shape[0]
    g = geom
    if g.pointwise():
        return cols.reshape(n, g.C, g.H, g.W)
    x = xp.empty((n, g.C, g.H, g.W), cols.dtype)
    launch("im2col.cu", f"col2im_kernel<{t}>", grid_1d(x.size, cols), THREADS,
           (cols, x) + i32(n, g.C, g.H, g.W, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw,
                            g.dh, g.dw))
    return x


# ---- the contract's unfolding kernels --------------------------------------------------------
@register_kernel("cuda", "im2col")
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """cols (N, C*kh*kw, OH*OW) of x (N, C, H, W)."""
    t = ctype(x)
    if t is None or x.ndim != 4:
        return None
    n, c = x.shape[:2]
    geom = ConvGeom(x.shape, (1, c, kh, kw), (sh, sw), (ph, pw), (dh, dw), 1)
    if not geom.valid():
        return None
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    cols = xp.empty((n, c * kh * kw, geom.OH * geom.OW), x.dtype)
    if cols.size:
        g = geom
        launch("im2col.cu", f"im2col_kernel<{t}>", grid_1d(cols.size, x), THREADS,
               (x, cols) + i32(n, g.C, g.H, g.W, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph,
                                g.pw, g.dh, g.dw))
    return cols


@register_kernel("cuda", "col2im")
def col2im(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) from cols (N, C*kh*kw, OH*OW), overlapping taps summed (a gather)."""
    t = ctype(cols)
    if t is None or cols.ndim != 3:
        return None
    n = cols.shape[0]
    geom = ConvGeom((n, C, H, W), (1, C, kh, kw), (sh, sw), (ph, pw), (dh, dw), 1)
    if not geom.valid() or cols.shape[1:] != (C * kh * kw, geom.OH * geom.OW):
        return None
    xp = array_module(cols)
    cols = xp.ascontiguousarray(cols)
    x = xp.empty((n, C, H, W), cols.dtype)
    if x.size:
        g = geom
        launch("im2col.cu", f"col2im_kernel<{t}>", grid_1d(x.size, cols), THREADS,
               (cols, x) + i32(n, g.C, g.H, g.W, g.OH, g.OW, g.kh, g.kw, g.sh, g.sw, g.ph,
                                g.pw, g.dh, g.dw))
    return x
