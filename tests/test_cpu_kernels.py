"""The C++ CPU kernels (gpudiff._C via gpudiff/runtime/cpu_kernels.py) against NumPy
reference implementations written here, and against PyTorch where it has the same op.

Skipped when gpudiff._C is not built.
"""
import numpy as np
import pytest

pytest.importorskip("gpudiff._C")
from gpudiff.runtime import cpu_kernels as K

torch = pytest.importorskip("torch")
F = torch.nn.functional

DTYPES = [np.float32, np.float64]


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- NumPy references ------------------------------------------------------------------
def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def im2col_ref(x, kh, kw, sh, sw, ph, pw, dh, dw):
    N, C, H, W = x.shape
    OH, OW = out_size(H, kh, sh, ph, dh), out_size(W, kw, sw, pw, dw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((N, C, kh, kw, OH, OW), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh,
                                  j * dw: j * dw + sw * (OW - 1) + 1: sw]
    return cols.reshape(N, C * kh * kw, OH * OW)


def col2im_ref(cols, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw):
    N = cols.shape[0]
    OH, OW = out_size(H, kh, sh, ph, dh), out_size(W, kw, sw, pw, dw)
    c6 = cols.reshape(N, C, kh, kw, OH, OW)
    xp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i * dh: i * dh + sh * (OH - 1) + 1: sh,
               j * dw: j * dw + sw * (OW - 1) + 1: sw] += c6[:, :, i, j]
    return xp[:, :, ph: ph + H, pw: pw + W]


def pool_out(n, k, s, p, d, ceil_mode):
    span = n + 2 * p - d * (k - 1) - 1
    o = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def max_pool_ref(x, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    """Loop reference with PyTorch's rules: first max wins ties, NaN wins."""
    N, C, H, W = x.shape
    OH, OW = pool_out(H, kh, sh, ph, dh, ceil_mode), pool_out(W, kw, sw, pw, dw, ceil_mode)
    y = np.empty((N, C, OH, OW), x.dtype)
    idx = np.empty((N, C, OH, OW), np.int64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    best, bi = -np.inf, None
                    for i in range(kh):
                        for j in range(kw):
                            h, w = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                            if 0 <= h < H and 0 <= w < W:
                                v = x[n, c, h, w]
                                if bi is None:
                                    bi = h * W + w
                                if v > best or np.isnan(v):
                                    best, bi = v, h * W + w
                    y[n, c, oh, ow], idx[n, c, oh, ow] = best, bi
    return y, idx


def avg_pool_ref(x, kh, kw, sh, sw, ph, pw, ceil_mode, cip, dov):
    N, C, H, W = x.shape
    OH, OW = pool_out(H, kh, sh, ph, 1, ceil_mode), pool_out(W, kw, sw, pw, 1, ceil_mode)
    y = np.zeros((N, C, OH, OW), x.dtype)
    for oh in range(OH):
        for ow in range(OW):
            h0, w0 = oh * sh - ph, ow * sw - pw
            h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
            size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            div = dov if dov else (size if cip else (h1 - h0) * (w1 - w0))
            y[:, :, oh, ow] = x[:, :, h0:h1, w0:w1].sum(axis=(2, 3)) / div
    return y


def softmax_ref(x, dim):
    z = x - x.max(axis=dim, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=dim, keepdims=True)


def log_softmax_ref(x, dim):
    z = x - x.max(axis=dim, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=dim, keepdims=True))


def cross_entropy_ref(x, t, w, ignore_index, eps):
    N, C = x.shape
    w = np.ones(C, x.dtype) if w is None else w
    logp = log_softmax_ref(x.astype(np.float64), 1)
    p = np.exp(logp)
    keep = t != ignore_index
    tt = np.where(keep, t, 0)
    a = eps / C * np.broadcast_to(w, (N, C)).copy()
    a[np.arange(N), tt] += (1 - eps) * w[tt]
    losses = -(a * logp).sum(1)
    dl = a.sum(1, keepdims=True) * p - a
    losses[~keep] = 0
    dl[~keep] = 0
    return losses, dl


# ---- im2col / col2im -------------------------------------------------------------------
GEOMS = [  # (N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw)
    (2, 3, 7, 9, 3, 3, 1, 1, 0, 0, 1, 1),
    (2, 3, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1),
    (1, 2, 8, 8, 3, 2, 2, 3, 1, 0, 1, 1),
    (2, 2, 9, 10, 3, 3, 1, 2, 2, 3, 2, 2),
    (1, 1, 5, 5, 5, 5, 1, 1, 0, 0, 1, 1),
    (1, 4, 6, 5, 1, 1, 1, 1, 0, 0, 1, 1),
    (1, 2, 4, 4, 2, 2, 3, 3, 2, 2, 1, 1),   # padding wider than the stride walk
    (64, 32, 26, 26, 3, 3, 1, 1, 0, 0, 1, 1),  # the MNIST net's conv2: both threads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GEOMS)
def test_im2col_matches_reference(g, dtype, rng):
    N, C, H, W, *k = g
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    got = K.im2col(x, *k)
    want = im2col_ref(x, *k)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # a pure copy: bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", GEOMS)
def test_col2im_matches_reference_and_is_adjoint(g, dtype, rng):
    N, C, H, W, *k = g
    kh, kw, sh, sw, ph, pw, dh, dw = k
    L = out_size(H, kh, sh, ph, dh) * out_size(W, kw, sw, pw, dw)
    cols = rng.standard_normal((N, C * kh * kw, L)).astype(dtype)
    got = K.col2im(cols, C, H, W, *k)
    np.testing.assert_allclose(got, col2im_ref(cols, C, H, W, *k), **tol(dtype))
    # <im2col(x), cols> == <x, col2im(cols)>: col2im is im2col's transpose
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    lhs = np.vdot(K.im2col(x, *k).astype(np.float64), cols.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), got.astype(np.float64))
    assert lhs == pytest.approx(rhs, rel=1e-4 if dtype == np.float32 else 1e-10)


def test_im2col_noncontiguous_input_is_copied(rng):
    x = rng.standard_normal((3, 4, 6, 6)).transpose(1, 0, 2, 3)  # (4, 3, 6, 6) view
    np.testing.assert_array_equal(K.im2col(x, 3, 3, 1, 1, 1, 1, 1, 1),
                                  im2col_ref(np.ascontiguousarray(x), 3, 3, 1, 1, 1, 1, 1, 1))


def test_unsupported_dtype_falls_back():
    x = np.zeros((1, 1, 4, 4), np.int32)
    assert K.im2col(x, 2, 2, 1, 1, 0, 0, 1, 1) is None
    assert K.max_pool2d(x, 2, 2, 2, 2, 0, 0, 1, 1, False) is None
    assert K.relu(x) is None
    assert K.softmax(np.zeros(3, np.float16), 0) is None


def test_kernel_too_large_raises():
    with pytest.raises(ValueError):
        K.im2col(np.zeros((1, 1, 2, 2), np.float32), 3, 3, 1, 1, 0, 0, 1, 1)


# ---- pooling ---------------------------------------------------------------------------
POOLS = [  # (N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode)
    (2, 3, 8, 8, 2, 2, 2, 2, 0, 0, 1, 1, False),
    (2, 3, 7, 9, 2, 2, 2, 2, 0, 0, 1, 1, True),
    (2, 2, 9, 7, 3, 3, 2, 2, 1, 1, 1, 1, False),
    (2, 2, 9, 7, 3, 3, 2, 2, 1, 1, 1, 1, True),
    (1, 2, 10, 11, 3, 2, 3, 1, 1, 1, 2, 3, True),
    (1, 1, 6, 6, 3, 3, 1, 1, 0, 0, 1, 1, False),   # overlapping windows
    (1, 1, 5, 5, 2, 2, 3, 3, 1, 1, 1, 1, True),    # ceil mode drops the padding-only window
    (64, 64, 24, 24, 2, 2, 2, 2, 0, 0, 1, 1, False),  # the MNIST net's pool
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", POOLS)
def test_max_pool2d_matches_reference_and_torch(g, dtype, rng):
    N, C, H, W, *k = g
    # rounded values make ties frequent: the first max must win
    x = np.round(rng.standard_normal((N, C, H, W)) * 2).astype(dtype)
    y, idx = K.max_pool2d(x, *k)
    if N * C <= 8:
        yr, ir = max_pool_ref(x, *k)
        np.testing.assert_array_equal(y, yr)
        np.testing.assert_array_equal(idx, ir)
    kh, kw, sh, sw, ph, pw, dh, dw, ceil = k
    yt, it = F.max_pool2d(torch.from_numpy(x), (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                          ceil_mode=ceil, return_indices=True)
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(idx, it.numpy())


def test_max_pool2d_nan_and_inf():
    x = np.array([[[[1, np.nan, 3, -np.inf],
                    [0, 2, -np.inf, -np.inf]]]], np.float32)
    y, idx = K.max_pool2d(x, 2, 2, 2, 2, 0, 0, 1, 1, False)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1
    assert y[0, 0, 0, 1] == 3 and idx[0, 0, 0, 1] == 2
    y, idx = K.max_pool2d(x, 2, 2, 2, 2, 0, 0, 1, 2, False)  # generic path, dilation
    yr, ir = max_pool_ref(x, 2, 2, 2, 2, 0, 0, 1, 2, False)
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(idx, ir)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", POOLS)
def test_max_pool2d_backward_routes_to_argmax(g, dtype, rng):
    N, C, H, W, *k = g
    x = np.round(rng.standard_normal((N, C, H, W)) * 2).astype(dtype)
    y, idx = K.max_pool2d(x, *k)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = K.max_pool2d_backward(gy, idx, H, W)
    want = np.zeros((N * C, H * W), np.float64)
    np.add.at(want, (np.arange(N * C)[:, None], idx.reshape(N * C, -1)),
              gy.reshape(N * C, -1))
    np.testing.assert_allclose(gx, want.reshape(N, C, H, W), **tol(dtype))


def test_max_pool2d_backward_rejects_bad_index():
    gy = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(IndexError):
        K.max_pool2d_backward(gy, np.array([[[[16]]]]), 4, 4)


def test_max_pool2d_unbatched():
    x = np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4)
    y, idx = K.max_pool2d(x, 2, 2, 2, 2, 0, 0, 1, 1, False)
    assert y.shape == (2, 2, 2)
    np.testing.assert_array_equal(y[1], [[21, 23], [29, 31]])
    np.testing.assert_array_equal(idx[0], [[5, 7], [13, 15]])


AVG = [  # (N, C, H, W, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override)
    (2, 3, 8, 8, 2, 2, 2, 2, 0, 0, False, True, None),
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1, False, True, None),
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1, False, False, None),
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1, True, True, None),
    (2, 3, 7, 9, 3, 3, 2, 2, 1, 1, True, False, None),
    (1, 2, 7, 6, 3, 2, 2, 1, 1, 1, True, True, 5),
    (1, 2, 5, 5, 2, 2, 3, 3, 1, 1, True, True, None),
    (1, 2, 7, 9, 2, 2, 2, 2, 0, 0, True, True, None),     # non-overlapping, clipped edges
    (1, 2, 7, 9, 2, 2, 2, 2, 0, 0, True, False, None),
    (2, 2, 6, 7, 3, 3, 3, 3, 0, 0, True, True, 2),        # 3x3 windows, divisor override
    (64, 6, 28, 28, 2, 2, 2, 2, 0, 0, False, True, None),  # LeNet's pool
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", AVG)
def test_avg_pool2d_matches_reference_and_torch(g, dtype, rng):
    N, C, H, W, *k = g
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    y = K.avg_pool2d(x, *k)
    np.testing.assert_allclose(y, avg_pool_ref(x, *k), **tol(dtype))
    kh, kw, sh, sw, ph, pw, ceil, cip, dov = k
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.avg_pool2d(xt, (kh, kw), (sh, sw), (ph, pw), ceil, cip, dov)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol(dtype))
    gy = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    gx = K.avg_pool2d_backward(gy, H, W, *k)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **tol(dtype))
    # the backward is the forward's transpose: <avg(x), gy> == <x, avg_backward(gy)>
    assert np.vdot(y.astype(np.float64), gy) == pytest.approx(
        np.vdot(x.astype(np.float64), gx), rel=1e-4)


# ---- element-wise ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 100_003])  # one thread, and both
def test_elementwise_kernels(dtype, n, rng):
    x = (rng.standard_normal(n) * 3).astype(dtype)
    x[:3] = [0.0, -0.0, np.nan] if n > 3 else x[:3]
    gy = rng.standard_normal(n).astype(dtype)
    t = tol(dtype)
    np.testing.assert_array_equal(K.relu(x), np.where(x < 0, 0, x))
    y = np.maximum(x, 0)
    np.testing.assert_array_equal(K.relu_backward(y, gy), gy * (y > 0))
    np.testing.assert_allclose(K.leaky_relu(x, 0.1), np.where(x > 0, x, x * dtype(0.1)), **t)
    np.testing.assert_allclose(K.leaky_relu_backward(x, gy, 0.1),
                               np.where(x > 0, gy, gy * dtype(0.1)), **t)
    s = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(K.sigmoid(x), s, rtol=1e-6 if dtype == np.float32 else 1e-14,
                               atol=1e-7 if dtype == np.float32 else 1e-15)
    s = s.astype(dtype)
    np.testing.assert_allclose(K.sigmoid_backward(s, gy), gy * s * (1 - s), **t)
    th = np.tanh(x)
    np.testing.assert_allclose(K.tanh_backward(th, gy), gy * (1 - th * th), **t)


def test_sigmoid_float_is_accurate_everywhere():
    # the vectorised float exp: within a few ulp of the float64 result over the whole range
    x = np.linspace(-100, 100, 2_000_001, dtype=np.float32)
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(K.sigmoid(x), want, rtol=4e-7, atol=1e-30)


def test_sigmoid_extremes():
    # exp(-x) overflows to inf for very negative x: the result is the limit 0, not NaN
    x = np.array([-1000, -100, 0, 100, 1000], np.float32)
    np.testing.assert_array_equal(K.sigmoid(x), [0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(K.sigmoid(x.astype(np.float64))[[0, 2, 3, 4]], [0, 0.5, 1, 1])


def test_elementwise_keeps_shape():
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 2, 2)
    assert K.relu(x).shape == (3, 2, 2)
    assert K.relu_backward(x, x).shape == (3, 2, 2)
    s = np.array(0.5)  # 0-d stays 0-d
    assert K.sigmoid(s).shape == () and K.sigmoid_backward(s, s).shape == ()
    assert K.sigmoid_backward(s, s) == 0.125
    assert K.softmax(s, 0).shape == () and K.softmax(s, 0) == 1


# ---- softmax family --------------------------------------------------------------------
SHAPES_DIMS = [((5, 10), 1), ((5, 10), 0), ((5, 10), -1), ((4, 3, 5, 6), 1),
               ((2, 3, 70, 2), 2), ((300, 1000), 1), ((7,), 0), ((3, 200, 130), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_softmax_family(shape, dim, dtype, rng):
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    x.flat[0] = 80  # large logits stay finite (stable)
    t = {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}
    y = K.softmax(x, dim)
    np.testing.assert_allclose(y, softmax_ref(x.astype(np.float64), dim), **t)
    ly = K.log_softmax(x, dim)
    np.testing.assert_allclose(ly, log_softmax_ref(x.astype(np.float64), dim), **t)
    gy = rng.standard_normal(shape).astype(dtype)
    y64, gy64 = y.astype(np.float64), gy.astype(np.float64)
    np.testing.assert_allclose(K.softmax_backward(y, gy, dim),
                               y64 * (gy64 - (gy64 * y64).sum(dim, keepdims=True)), **t)
    np.testing.assert_allclose(K.log_softmax_backward(ly, gy, dim),
                               gy64 - np.exp(ly.astype(np.float64)) * gy64.sum(dim, keepdims=True),
                               **t)


def test_softmax_extremes():
    x = np.array([[1000.0, 0.0, -1000.0], [-np.inf, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(K.softmax(x, 1), [[1, 0, 0], [0, 0.5, 0.5]])
    ly = K.log_softmax(x, 1)
    assert ly[0, 0] == 0 and ly[0, 2] == -2000 and ly[1, 0] == -np.inf
    x = np.array([[1.0, np.nan]], np.float64)
    assert np.isnan(K.softmax(x, 1)).all()


def test_softmax_bad_dim():
    with pytest.raises(IndexError):
        K.softmax(np.zeros((2, 3), np.float32), 2)


CE = [  # (N, C, weighted, ignore_index, label_smoothing)
    (8, 5, False, -100, 0.0),
    (8, 5, True, -100, 0.0),
    (8, 5, False, 2, 0.0),
    (8, 5, True, 2, 0.0),
    (8, 5, False, -100, 0.1),
    (8, 5, True, 1, 0.25),
    (500, 1000, True, 3, 0.1),  # both threads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CE)
def test_cross_entropy_matches_reference_and_torch(case, dtype, rng):
    N, C, weighted, ignore, eps = case
    x = (rng.standard_normal((N, C)) * 4).astype(dtype)
    t = rng.integers(0, C, N)
    t[1] = ignore if ignore >= 0 else t[1]
    w = rng.uniform(0.5, 2, C).astype(dtype) if weighted else None
    losses, dl = K.cross_entropy(x, t, w, ignore, eps)
    lr, dr = cross_entropy_ref(x, t, w, ignore, eps)
    tl = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(losses, lr, **tl)
    np.testing.assert_allclose(dl, dr, **tl)
    # PyTorch: per-row losses, and the gradient of their sum is dlogits row by row
    xt = torch.from_numpy(x).requires_grad_()
    lt = F.cross_entropy(xt, torch.from_numpy(t), None if w is None else torch.from_numpy(w),
                         ignore_index=ignore, reduction="none", label_smoothing=eps)
    lt.sum().backward()
    np.testing.assert_allclose(losses, lt.detach().numpy(), **tl)
    np.testing.assert_allclose(dl, xt.grad.numpy(), **tl)
    # and the mean reduction's divisor is sum(weight[target]) over kept rows (contract)
    keep = t != ignore
    div = (w[t[keep]].sum() if weighted else keep.sum())
    mean_t = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                             None if w is None else torch.from_numpy(w), ignore_index=ignore,
                             label_smoothing=eps)
    assert losses.astype(np.float64).sum() / div == pytest.approx(mean_t.item(), rel=1e-5)


def test_cross_entropy_target_out_of_range():
    with pytest.raises(IndexError, match="out of bounds"):
        K.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3]), None, -100, 0.0)


def test_cross_entropy_int32_target(rng):
    x = rng.standard_normal((4, 3))
    t = np.array([0, 1, 2, 1], np.int32)
    l32, _ = K.cross_entropy(x, t, None, -100, 0.0)
    l64, _ = K.cross_entropy(x, t.astype(np.int64), None, -100, 0.0)
    np.testing.assert_array_equal(l32, l64)


# ---- the GEMM of the convolutions (csrc/cpu/gemm.cpp) --------------------------------------
GEMMS = [(1, 1, 1), (5, 7, 3), (13, 300, 33), (64, 288, 576), (16, 144, 1024), (576, 64, 90),
         (130, 17, 2100), (9, 600, 40)]  # (M, K, N): edges, KC and NC blocks, MC blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", GEMMS)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm(mkn, ta, tb, dtype, rng):
    M, Kd, N = mkn
    a = rng.standard_normal((Kd, M) if ta else (M, Kd)).astype(dtype)
    b = rng.standard_normal((N, Kd) if tb else (Kd, N)).astype(dtype)
    c0 = rng.standard_normal((M, N)).astype(dtype)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    t = {"rtol": 1e-4, "atol": 1e-4 * np.sqrt(Kd)} if dtype == np.float32 else \
        {"rtol": 1e-12, "atol": 1e-12 * Kd}
    got = K._C.gemm(a, b, ta, tb)
    assert got.dtype == dtype and got.shape == (M, N)
    np.testing.assert_allclose(got, want, **t)
    np.testing.assert_allclose(K._C.gemm(a, b, ta, tb, c0), want + c0, **t)  # beta = 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(64, 9216, 128), (128, 64, 9216), (64, 128, 10), (3, 4, 5),
                                 (1, 7, 1), (70, 33, 0)])
def test_matmul_kernel_layouts(mkn, dtype, rng):
    M, Kd, N = mkn
    a = rng.standard_normal((M, Kd)).astype(dtype)
    b = rng.standard_normal((Kd, N)).astype(dtype)
    want = a.astype(np.float64) @ b.astype(np.float64)
    t = {"rtol": 1e-4, "atol": 1e-4 * np.sqrt(Kd)} if dtype == np.float32 else \
        {"rtol": 1e-11, "atol": 1e-11 * Kd}
    for A in (a, np.ascontiguousarray(a.T).T):          # row-major, and a transposed view
        for B in (b, np.ascontiguousarray(b.T).T):
            got = K.matmul(A, B)
            assert got.shape == (M, N) and got.dtype == dtype
            np.testing.assert_allclose(got, want, **t)
    strided = K.matmul(a[:, ::2], b[::2])                 # None (NumPy's turn) or right
    assert strided is None or np.allclose(strided, a[:, ::2].astype(np.float64) @ b[::2],
                                          rtol=1e-4, atol=1e-3 * np.sqrt(Kd))
    assert K.matmul(a[None], b) is None                    # batched: NumPy's turn


def test_gemm_checks_shapes():
    with pytest.raises(ValueError, match="inner"):
        K._C.gemm(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))


# ---- whole-op convolution (csrc/cpu/conv.cpp) ---------------------------------------------
def conv_ref(x, w, b, stride, padding, dilation, groups):
    N, _, H, W = x.shape
    Kout, Cg, kh, kw = w.shape
    k = (kh, kw, *stride, *padding, *dilation)
    cols = im2col_ref(x.astype(np.float64), *k)
    L = cols.shape[-1]
    cols = cols.reshape(N, groups, Cg * kh * kw, L)
    y = np.matmul(w.reshape(groups, Kout // groups, -1).astype(np.float64), cols)
    y = y.reshape(N, Kout, out_size(H, kh, stride[0], padding[0], dilation[0]),
                  out_size(W, kw, stride[1], padding[1], dilation[1]))
    return y if b is None else y + b[None, :, None, None]


CONVS = [  # (x shape, w shape, stride, padding, dilation, groups, bias)
    ((2, 3, 7, 8), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    ((3, 4, 9, 7), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2, False),
    ((2, 4, 6, 6), (4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 4, True),      # depthwise
    ((2, 6, 5, 4), (3, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1, True),      # pointwise
    ((2, 6, 5, 4), (4, 3, 1, 1), (1, 1), (0, 0), (1, 1), 2, False),     # grouped pointwise
    ((2, 4, 9, 9), (5, 4, 1, 1), (2, 2), (0, 0), (1, 1), 1, True),      # strided 1x1
    ((1, 3, 8, 8), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),      # one sample
    ((16, 8, 12, 12), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),  # both threads
    ((37, 8, 4, 4), (16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),    # chunks of samples
    ((9, 4, 3, 3), (6, 2, 1, 1), (1, 1), (0, 0), (1, 1), 2, True),      # chunked pointwise
    # few filters, many channels, stride 1: the input gradient as a flipped-kernel conv
    ((4, 16, 9, 9), (8, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    ((3, 16, 11, 10), (16, 16, 3, 2), (1, 1), (1, 0), (2, 3), 1, False),
    ((2, 20, 7, 7), (4, 20, 5, 5), (1, 1), (2, 0), (1, 1), 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVS)
def test_conv_kernels(case, dtype, rng):
    xs, ws, stride, padding, dilation, groups, bias = case
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if bias else None
    t = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    y = K.conv2d(x, w, b, stride, padding, dilation, groups)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, conv_ref(x, w, b, stride, padding, dilation, groups), **t)
    # adjoints: <conv(x, w), gy> == <x, dgrad(gy, w)> == <w, wgrad(gy, x)>
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = K.conv2d_backward_input(gy, w, xs, stride, padding, dilation, groups)
    gw = K.conv2d_backward_weight(gy, x, ws, stride, padding, dilation, groups)
    assert gx.shape == xs and gw.shape == ws
    y0 = conv_ref(x, w, None, stride, padding, dilation, groups)
    ip = np.vdot(y0, gy)
    rel = 1e-4 if dtype == np.float32 else 1e-10
    assert np.vdot(x.astype(np.float64), gx) == pytest.approx(ip, rel=rel)
    assert np.vdot(w.astype(np.float64), gw) == pytest.approx(ip, rel=rel)
    # and element-wise against PyTorch's gradients
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    F.conv2d(xt, wt, None, stride, padding, dilation, groups).backward(torch.from_numpy(gy))
    np.testing.assert_allclose(gx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **t)


# 3x3, stride 1, padding 1 convolutions on images of 14+ pixels a side take conv.cpp's
# implicit GEMM on a padded grid (forward, and the input gradient as the flipped-kernel
# convolution); the weight gradient takes its dot-product kernel below 32 filters and the
# grid GEMM from 32 on. Odd sizes, batch 1, channel and filter counts off the vector width.
CONV3 = [  # (N, C, H, W, K)
    (3, 5, 17, 15, 17),   # odd sizes; K = 2 blocks of 8 + 1 in the dot kernel
    (1, 3, 16, 19, 2),    # one sample, fewer filters than a block
    (2, 16, 32, 32, 16),  # ResNet-20 stage 1 (two chunks of one sample)
    (9, 33, 14, 16, 40),  # the grid GEMM for the weight gradient; samples chunked
    (5, 7, 21, 14, 33),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV3)
def test_conv3x3_grid_path(case, dtype, rng):
    N, C, H, W, Kf = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Kf, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(Kf).astype(dtype)
    gy = rng.standard_normal((N, Kf, H, W)).astype(dtype)
    one, pad = (1, 1), (1, 1)
    args = (one, pad, one, 1)
    y = K.conv2d(x, w, b, *args)
    gx = K.conv2d_backward_input(gy, w, x.shape, *args)
    gw = K.conv2d_backward_weight(gy, x, w.shape, *args)
    # the existing im2col path: the same convolution of the explicitly padded input
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    no = ((1, 1), (0, 0), (1, 1), 1)
    t = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    np.testing.assert_allclose(y, K.conv2d(xp, w, b, *no), **t)
    gxp = K.conv2d_backward_input(gy, w, xp.shape, *no)
    np.testing.assert_allclose(gx, gxp[:, :, 1:-1, 1:-1], **t)
    np.testing.assert_allclose(gw, K.conv2d_backward_weight(gy, xp, w.shape, *no), **t)
    # and PyTorch in float64
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    wt = torch.from_numpy(w.astype(np.float64)).requires_grad_()
    yt = F.conv2d(xt, wt, torch.from_numpy(b.astype(np.float64)), 1, 1)
    yt.backward(torch.from_numpy(gy.astype(np.float64)))
    np.testing.assert_allclose(y, yt.detach().numpy(), **t)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **t)
    # deterministic: a second run gives the same bits
    assert np.array_equal(y, K.conv2d(x, w, b, *args))
    assert np.array_equal(gx, K.conv2d_backward_input(gy, w, x.shape, *args))
    assert np.array_equal(gw, K.conv2d_backward_weight(gy, x, w.shape, *args))


# k x k (and kh x kw) stride-1 convolutions with padding 0 <= p <= k - 1 take the same grid
# (rows W + pw long, samples H + ph rows apart): the forward where it wastes <= 15% (5x5
# pad 2 on 28x28, full padding), the input gradient as the flipped convolution there (4+
# channels), the weight gradient's dot kernel (KW taps x KB filters in registers) below 32
# filters where the grid wastes <= 2x (LeNet's 5x5 valid conv on 14x14: 1.96).
CONVK = [  # (N, C, H, W, K, (kh, kw), (ph, pw))
    (3, 1, 28, 28, 6, (5, 5), (2, 2)),    # LeNet conv1: all three on the grid, K = 4 + 2
    (4, 6, 14, 14, 16, (5, 5), (0, 0)),   # LeNet conv2: the weight gradient's dot kernel
    (1, 5, 13, 11, 9, (5, 5), (4, 4)),    # one sample, full padding (no waste)
    (3, 5, 17, 15, 7, (5, 5), (1, 1)),    # odd sizes, padding between 0 and k - 1
    (2, 4, 15, 10, 9, (7, 7), (3, 3)),    # 7x7: 3 filters a block
    (2, 3, 12, 12, 5, (4, 4), (1, 2)),    # even kernel, uneven padding
    (2, 6, 11, 13, 5, (3, 5), (2, 1)),    # kh != kw
    (5, 7, 28, 28, 33, (5, 5), (2, 2)),   # 33 filters: the weight gradient's grid GEMM
    (2, 16, 28, 28, 2, (5, 5), (2, 2)),   # flipped input gradient on the grid, K = 2
    (2, 8, 12, 12, 4, (5, 5), (1, 1)),    # grid waste 1.69: the forward on im2col, wgrad dot
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVK)
def test_convkxk_grid_path(case, dtype, rng):
    N, C, H, W, Kf, (kh, kw), pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Kf, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(Kf).astype(dtype)
    one = (1, 1)
    args = (one, pad, one, 1)
    y = K.conv2d(x, w, b, *args)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = K.conv2d_backward_input(gy, w, x.shape, *args)
    gw = K.conv2d_backward_weight(gy, x, w.shape, *args)
    t = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    np.testing.assert_allclose(y, conv_ref(x, w, b, *args), **t)
    # the im2col path: a 2-group convolution of the input twice over (groups > 1 never
    # take the grid) gives the same result in each half
    x2, w2 = np.concatenate([x, x], 1), np.concatenate([w, w], 0)
    g2 = (one, pad, one, 2)
    np.testing.assert_allclose(y, K.conv2d(x2, w2, np.concatenate([b, b]), *g2)[:, :Kf], **t)
    gy2 = np.concatenate([gy, gy], 1)
    np.testing.assert_allclose(gx, K.conv2d_backward_input(gy2, w2, x2.shape, *g2)[:, :C], **t)
    np.testing.assert_allclose(gw, K.conv2d_backward_weight(gy2, x2, w2.shape, *g2)[:Kf], **t)
    # and PyTorch in float64
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    wt = torch.from_numpy(w.astype(np.float64)).requires_grad_()
    yt = F.conv2d(xt, wt, torch.from_numpy(b.astype(np.float64)), 1, pad)
    yt.backward(torch.from_numpy(gy.astype(np.float64)))
    np.testing.assert_allclose(y, yt.detach().numpy(), **t)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **t)
    # deterministic: a second run gives the same bits
    assert np.array_equal(y, K.conv2d(x, w, b, *args))
    assert np.array_equal(gx, K.conv2d_backward_input(gy, w, x.shape, *args))
    assert np.array_equal(gw, K.conv2d_backward_weight(gy, x, w.shape, *args))


# Winograd F(2x2, 3x3) (conv.cpp): 3x3, stride 1, one group, padding <= 2; the forward, the
# input gradient (the flipped-kernel convolution, padding 2 - p) and the weight gradient
# (the adjoint chain). Mode 'always' forces it wherever it fits, 'off' gives the exact paths;
# the kernel's call counters prove which one ran. Odd sizes (half-outside tiles), batch 1,
# channel and filter counts off the vector width, padding 0 / 1 / 2.
WINO = [  # (N, C, H, W, K, padding)
    (3, 5, 17, 15, 17, 1),   # odd sizes: the last tile row and column half outside
    (1, 3, 8, 8, 2, 1),      # one sample, fewer channels and filters than a vector
    (2, 33, 9, 7, 19, 0),    # padding 0, counts off the vector width
    (2, 16, 9, 10, 33, 2),   # padding 2 (the flipped convolution of padding 0)
    (5, 64, 8, 8, 64, 1),    # ResNet stage 3 (smaller batch): samples in chunks
    (9, 32, 16, 16, 32, 1),  # ResNet stage 2: chunks over both threads
    (2, 7, 3, 3, 5, 1),      # 3x3 images: 2x2 tiles, half of them outside
    (1, 4, 4, 5, 3, 0),      # a 2x3 output: one row of tiles, the last one half outside
    (3, 16, 9, 7, 16, 0),    # 16 by 16: gemm16 (float32, AVX-512), rows off its block of 8
    (2, 16, 12, 12, 16, 1),  # ResNet stage 1's channel counts
]


def _wino_run(x, w, b, gy, pad):
    args = ((1, 1), (pad, pad), (1, 1), 1)
    return (K.conv2d(x, w, b, *args), K.conv2d_backward_input(gy, w, x.shape, *args),
            K.conv2d_backward_weight(gy, x, w.shape, *args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINO)
def test_conv3x3_winograd(case, dtype, rng):
    N, C, H, W, Kf, pad = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Kf, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(Kf).astype(dtype)
    OH, OW = H + 2 * pad - 2, W + 2 * pad - 2
    gy = rng.standard_normal((N, Kf, OH, OW)).astype(dtype)
    c0 = K.winograd_calls()
    with K.conv_winograd("always"):
        y, gx, gw = _wino_run(x, w, b, gy, pad)
    c1 = K.winograd_calls()
    assert tuple(b - a for a, b in zip(c0, c1)) == (1, 1, 1)  # all three took Winograd
    with K.conv_winograd("off"):
        y0, gx0, gw0 = _wino_run(x, w, b, gy, pad)
    assert K.winograd_calls() == c1                           # and none of these
    t = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-11}
    assert y.dtype == gx.dtype == gw.dtype == dtype
    assert y.shape == (N, Kf, OH, OW) and gx.shape == x.shape and gw.shape == w.shape
    np.testing.assert_allclose(y, conv_ref(x, w, b, (1, 1), (pad, pad), (1, 1), 1), **t)
    np.testing.assert_allclose(y, y0, **t)
    np.testing.assert_allclose(gx, gx0, **t)
    np.testing.assert_allclose(gw, gw0, **t)
    # PyTorch in float64
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    wt = torch.from_numpy(w.astype(np.float64)).requires_grad_()
    yt = F.conv2d(xt, wt, torch.from_numpy(b.astype(np.float64)), 1, pad)
    yt.backward(torch.from_numpy(gy.astype(np.float64)))
    np.testing.assert_allclose(y, yt.detach().numpy(), **t)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **t)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **t)
    # deterministic: a second run gives the same bits
    with K.conv_winograd("always"):
        y2, gx2, gw2 = _wino_run(x, w, b, gy, pad)
    assert np.array_equal(y, y2) and np.array_equal(gx, gx2) and np.array_equal(gw, gw2)


def test_conv3x3_winograd_float32_error_is_small(rng):
    # float32 Winograd stays as close to the float64 result as the exact float32 path does
    # (within 4x) at ResNet's stage-3 depth (64 channels)
    x = rng.standard_normal((8, 64, 8, 8)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    gy = rng.standard_normal((8, 64, 8, 8)).astype(np.float32)
    ref = [a.astype(np.float64) for a in (x, w, gy)]
    exact64 = _wino_run(ref[0], ref[1], None, ref[2], 1)
    with K.conv_winograd("always"):
        wino = _wino_run(x, w, None, gy, 1)
    with K.conv_winograd("off"):
        exact = _wino_run(x, w, None, gy, 1)
    for a, e, r in zip(wino, exact, exact64):
        err_w = np.abs(a - r).max() / np.abs(r).max()
        err_e = np.abs(e - r).max() / np.abs(r).max()
        assert err_w < 1e-6 and err_w < 4 * err_e + 1e-7


def test_conv_winograd_dispatch_rule(rng):
    # auto: where it measured faster (32+ channels each side, or 16+ on 8x8 images, 128+
    # tiles); never for other geometries, even when forced
    def calls(xs, ws, stride=(1, 1), pad=(1, 1), groups=1, mode="auto"):
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        c0 = K.winograd_calls()
        with K.conv_winograd(mode):
            y = K.conv2d(x, w, None, stride, pad, (1, 1), groups)
            K.conv2d_backward_input(y, w, xs, stride, pad, (1, 1), groups)
            K.conv2d_backward_weight(y, x, ws, stride, pad, (1, 1), groups)
        return tuple(b - a for a, b in zip(c0, K.winograd_calls()))
    assert calls((8, 64, 8, 8), (64, 64, 3, 3)) == (1, 1, 1)      # ResNet stage 3
    assert calls((2, 32, 16, 16), (32, 32, 3, 3)) == (1, 1, 1)    # ResNet stage 2
    assert calls((8, 16, 8, 8), (16, 16, 3, 3)) == (1, 1, 1)      # 16 channels on 8x8
    # ResNet stage 1: 16 by 16 takes it in float32 where the 16-lane kernel runs (AVX-512)
    by16 = (1, 1, 1) if K._C.cpu_has_avx512() else (0, 0, 0)
    assert calls((2, 16, 32, 32), (16, 16, 3, 3)) == by16
    assert calls((2, 16, 32, 32), (32, 16, 3, 3)) == (0, 0, 0)    # 16 -> 32 channels
    assert calls((1, 64, 8, 8), (64, 64, 3, 3)) == (0, 0, 0)      # 16 tiles: too few
    assert calls((2, 8, 16, 16), (8, 8, 3, 3)) == (0, 0, 0)       # 8 channels
    assert calls((2, 32, 16, 16), (32, 32, 3, 3), mode="off") == (0, 0, 0)
    for kw in ({"stride": (2, 2)}, {"groups": 2}, {"pad": (3, 3)}):
        ws = (32, 16 if "groups" in kw else 32, 3, 3)
        assert calls((2, 32, 16, 16), ws, mode="always", **kw) == (0, 0, 0)
    assert calls((2, 32, 16, 16), (32, 32, 5, 5), pad=(2, 2), mode="always") == (0, 0, 0)


def test_conv_kernel_declines_what_it_cannot_do():
    x = np.zeros((1, 2, 5, 5), np.float32)
    assert K.conv2d(x, np.zeros((2, 2, 3, 3), np.float64), None, (1, 1), (0, 0), (1, 1), 1) \
        is None                                                            # mixed dtypes
    assert K.conv2d(x[0], np.zeros((2, 2, 3, 3), np.float32), None, (1, 1), (0, 0), (1, 1),
                    1) is None                                             # 3-D: op unbatches


# ---- adaptive pooling ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out", [((2, 3, 7, 9), (3, 4)), ((2, 3, 6, 6), (1, 1)),
                                       ((1, 2, 4, 5), (6, 7)), ((64, 16, 8, 8), (1, 1))])
def test_adaptive_pools_match_torch(shape, out, dtype, rng):
    x = np.round(rng.standard_normal(shape) * 2).astype(dtype)  # ties: the first wins
    xt = torch.from_numpy(x).requires_grad_()
    yt = F.adaptive_avg_pool2d(xt, out)
    gy = rng.standard_normal(yt.shape).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    np.testing.assert_allclose(K.adaptive_avg_pool2d(x, *out), yt.detach().numpy(), **tol(dtype))
    np.testing.assert_allclose(K.adaptive_avg_pool2d_backward(gy, *shape[2:]), xt.grad.numpy(),
                               **tol(dtype))
    y, idx = K.adaptive_max_pool2d(x, *out)
    ym, im = F.adaptive_max_pool2d(torch.from_numpy(x), out, return_indices=True)
    np.testing.assert_array_equal(y, ym.numpy())
    np.testing.assert_array_equal(idx, im.numpy())


# ---- batch norm pieces and dropout ---------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 7), (64, 16, 16, 16)])
def test_batch_norm_kernels(shape, dtype, rng):
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)      # an offset mean: two passes
    C = shape[1]
    axes = (0,) + tuple(range(2, len(shape)))
    mean, var = K._C.batch_norm_stats(x)
    x64 = x.astype(np.float64)
    t = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(mean, x64.mean(axes), **t)
    np.testing.assert_allclose(var, x64.var(axes), **t)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, m, invstd = K.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    rmt, rvt = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
    t2 = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(y, yt.detach().numpy(), **t2)
    np.testing.assert_allclose(rm, rmt.numpy(), **t2)
    np.testing.assert_allclose(rv, rvt.numpy(), **t2)
    gy = rng.standard_normal(shape).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    gx, gw, gb = K.batch_norm_backward(gy, x, w, m, invstd)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **t2)
    np.testing.assert_allclose(gw, wt.grad.numpy(), **t2)
    np.testing.assert_allclose(gb, bt.grad.numpy(), **t2)
    # eval mode uses the running statistics
    ye, _, _ = K.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
    want = (x64 - rm.reshape((1, C) + (1,) * (len(shape) - 2))) / np.sqrt(
        rv.reshape((1, C) + (1,) * (len(shape) - 2)) + 1e-5)
    want = want * w.reshape((1, C) + (1,) * (len(shape) - 2)) + b.reshape(
        (1, C) + (1,) * (len(shape) - 2))
    np.testing.assert_allclose(ye, want, **t2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", [((1000,), 1), ((64, 64, 12, 12), 1),
                                          ((64, 64, 12, 12), 144), ((3, 5, 7), 7)])
def test_dropout_kernel_matches_reference(shape, group, dtype, rng):
    from gpudiff.ops.dropout import dropout_ref
    x = rng.standard_normal(shape).astype(dtype)
    for p, seed in ((0.25, 12345), (0.5, 2**62 + 17), (0.0, 3), (1.0, 4)):
        y = K.dropout(x, p, seed, group)
        np.testing.assert_array_equal(y, dropout_ref(np, x, p, seed, group))
        kept = (y != 0).reshape(-1, group)
        assert (kept == kept[:, :1]).all()             # whole groups kept or dropped
        if p not in (0.0, 1.0):
            np.testing.assert_allclose(y[y != 0], x[y != 0] / (1 - p), rtol=1e-6)
            if kept.shape[0] >= 1000:                  # the keep rate is 1 - p
                assert abs(kept[:, 0].mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / kept.shape[0])
        else:
            assert (y == (x if p == 0 else 0)).all()
    # another seed, another mask
    assert (K.dropout(x, 0.5, 1, group) != K.dropout(x, 0.5, 2, group)).any()


# ---- fused optimizer step ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [{"momentum": 0.0}, {"momentum": 0.9},
                                  {"momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-2},
                                  {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
                                  {"momentum": 0.9, "maximize": True}])
def test_sgd_step_matches_the_reference_rule(opts, dtype, rng):
    o = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
    o.update(opts)
    shapes = [(3, 4), (5,), (3_000_000,)]                  # the last one splits over threads
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    bs = [rng.standard_normal(s).astype(dtype) if o["momentum"] else None for s in shapes]
    want_p, want_b = [], []
    for p, g, b in zip(ps, gs, bs):
        p, g = p.astype(np.float64), g.astype(np.float64)
        g = (-g if o["maximize"] else g) + o["weight_decay"] * p
        if o["momentum"]:
            b = o["momentum"] * b + (1 - o["dampening"]) * g
            g = g + o["momentum"] * b if o["nesterov"] else b
        want_p.append(p - 0.1 * g)
        want_b.append(b)
    assert K.sgd_step(ps, gs, bs, 0.1, **o) is None       # done in place
    t = tol(dtype) if dtype == np.float64 else {"rtol": 1e-6, "atol": 1e-6}
    for p, wp, b, wb in zip(ps, want_p, bs, want_b):
        np.testing.assert_allclose(p, wp, **t)
        if b is not None:
            np.testing.assert_allclose(b, wb, **t)


def test_sgd_step_declines_what_it_cannot_take():
    p = np.zeros(4, np.float16)
    assert K.sgd_step([p], [p], [None], 0.1, 0.0, 0.0, 0.0, False, False) is NotImplemented
    q = np.zeros((4, 4), np.float32)[:, ::2]
    assert K.sgd_step([q], [q], [None], 0.1, 0.0, 0.0, 0.0, False, False) is NotImplemented


def test_kernels_accept_equal_but_distinct_dtype_descriptors():
    # arrays that came through a pickle (DataLoader workers) carry a float32 descriptor that
    # is equal to, but not the same object as, numpy's builtin one
    import pickle

    import gpudiff
    import gpudiff.nn.functional as F
    x = pickle.loads(pickle.dumps(np.random.default_rng(0).random((2, 3, 8, 8), np.float32)))
    w = np.random.default_rng(1).random((4, 3, 3, 3), np.float32)
    assert x.dtype is not np.dtype("float32")
    y = F.conv2d(gpudiff.from_numpy(x), gpudiff.from_numpy(w))
    ref = F.conv2d(gpudiff.from_numpy(np.ascontiguousarray(x, np.dtype("float32"))),
                   gpudiff.from_numpy(w))
    np.testing.assert_array_equal(y.numpy(), ref.numpy())
