"""Convolution and pooling geometry: the one place output sizes are computed.

Used by the ops (gpudiff/ops/conv.py, pool.py), the CPU kernel wrappers and the CUDA kernel
wrappers, and by nn's modules for their argument pairs. Imports nothing from gpudiff: it is
at the bottom of the layers (docs/ARCHITECTURE.md).

Sizes are PyTorch's:
  convolution   OH = (H + 2p - d(k-1) - 1) // s + 1
  pooling       the same, or with ceil_mode rounded up, the last window still required to
                start inside the input or its left padding
  adaptive      bin i of n_out over n covers [floor(i*n/n_out), ceil((i+1)*n/n_out))
"""

INT32_MAX = 2**31 - 1


def pair(v, name="", what="an argument"):
    """(v, v) for an int, (v[0], v[1]) for a pair (or a 1-sequence, as PyTorch accepts).

    >>> pair(3), pair((1, 2))
    ((3, 3), (1, 2))
    """
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) != 2:
            raise ValueError(f"{name}: expected {what} to be a single int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_output_size(n, k, s, p, d):
    """Output length of a convolution over n inputs (kernel k, stride s, padding p,
    dilation d)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_output_size(n, k, s, p, d, ceil_mode):
    """Output length of a max/avg pooling window (PyTorch's rule, ceil_mode included)."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:  # the last window would start in the padding
        out -= 1
    return out


def adaptive_bins(n, n_out):
    """(starts, ends) of the adaptive pooling bins of n inputs into n_out outputs."""
    starts = [(i * n) // n_out for i in range(n_out)]
    ends = [-(-((i + 1) * n) // n_out) for i in range(n_out)]
    return starts, ends


class ConvGeom:
    """A 2-D convolution's sizes: x (N, C, H, W), w (K, C/G, kh, kw), y (N, K, OH, OW).

    >>> g = ConvGeom((8, 3, 32, 32), (16, 3, 3, 3), stride=1, padding=1, dilation=1, groups=1)
    >>> g.OH, g.OW, g.Rg, g.L
    (32, 32, 27, 1024)
    """

    __slots__ = ("N", "C", "H", "W", "K", "Cw", "kh", "kw", "sh", "sw", "ph", "pw", "dh",
                 "dw", "G", "OH", "OW")

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = (int(v) for v in x_shape)
        self.K, self.Cw, self.kh, self.kw = (int(v) for v in w_shape)  # Cw: C per group
        self.sh, self.sw = pair(stride)
        self.ph, self.pw = pair(padding)
        self.dh, self.dw = pair(dilation)
        self.G = int(groups)
        self.OH = conv_output_size(self.H, self.kh, self.sh, self.ph, self.dh)
        self.OW = conv_output_size(self.W, self.kw, self.sw, self.pw, self.dw)

    @property
    def taps(self):
        """(kh, kw, sh, sw, ph, pw, dh, dw): the im2col / col2im geometry arguments."""
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)

    @property
    def Cg(self):  # input channels per group
        return self.C // self.G

    @property
    def Kg(self):  # filters per group
        return self.K // self.G

    @property
    def Rg(self):  # rows of im2col columns per group
        return self.Cg * self.kh * self.kw

    @property
    def L(self):  # output positions per image
        return self.OH * self.OW

    def valid(self):
        """Positive sizes, consistent channels and int32 operand indices (the kernels' limit)."""
        if min(self.sh, self.sw, self.dh, self.dw, self.G, self.kh, self.kw) < 1 \
                or min(self.ph, self.pw) < 0:
            return False
        if self.Cw * self.G != self.C or self.K % self.G:
            return False
        if self.OH < 1 or self.OW < 1:
            return False
        return max(self.N * self.OH * self.OW, self.N * self.H * self.W, self.Rg,
                   self.Kg * self.kh * self.kw, self.K * self.Rg) <= INT32_MAX

    def kernel_args(self):
        """N, C, H, W, K, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, G: the CUDA kernels' order."""
        return (self.N, self.C, self.H, self.W, self.K, self.OH, self.OW, self.kh, self.kw,
                self.sh, self.sw, self.ph, self.pw, self.dh, self.dw, self.G)

    def depthwise(self):
        return self.Cg == 1 and self.Kg <= 4

    def pointwise(self):
        """1x1, stride 1, no padding: the im2col columns are x itself."""
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (1, 1, 1, 1, 0, 0)

    def flops(self):
        """Multiply-adds x 2 of one pass (forward, dgrad and wgrad are equal)."""
        return 2 * self.N * self.K * self.L * self.Rg

    def __repr__(self):
        return (f"ConvGeom(x=({self.N}, {self.C}, {self.H}, {self.W}), "
                f"w=({self.K}, {self.Cw}, {self.kh}, {self.kw}), stride=({self.sh}, {self.sw}), "
                f"padding=({self.ph}, {self.pw}), dilation=({self.dh}, {self.dw}), "
                f"groups={self.G}) -> ({self.OH}, {self.OW})")
