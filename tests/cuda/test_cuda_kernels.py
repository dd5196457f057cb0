"""Every 'cuda' kernel of the table against a NumPy (or PyTorch) reference.

Each test runs in the emulator in forward, reverse and random thread order, and on a real GPU
when there is one (``where`` fixture, tests/cuda/conftest.py). Column counts hit the warp and
block edges: 1, 31, 32, 33 (warp), 255, 256, 257 (the warp/block-per-row switch), 1000.
"""
import numpy as np
import pytest
import torch

from gpudiff.runtime import cuda as rc
from gpudiff.runtime import kernels
from gpudiff.runtime.cuda.launch import emulator, launch

EDGE_COLS = [1, 31, 32, 33, 255, 256, 257, 1000]
SIZES = [1, 31, 32, 33, 255, 256, 257, 1000, 4099]
DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def rand(shape, dtype, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def test_table_has_the_contract_names():
    names = set(kernels.KERNELS["cuda"])
    assert {"relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid",
            "sigmoid_backward", "tanh", "tanh_backward", "softmax", "log_softmax",
            "softmax_backward", "log_softmax_backward", "cross_entropy"} <= names
    assert kernels.KERNELS["cuda"]["softmax"] is rc.softmax.softmax


# ---- elementwise ------------------------------------------------------------------------------
def _act_refs(slope):
    f64 = np.float64
    return {
        "relu": (lambda x: np.where(x < 0, 0, x), lambda y, gy: np.where(y > 0, gy, 0)),
        "leaky_relu": (lambda x: np.where(x > 0, x, x.astype(f64) * slope),
                       lambda x, gy: np.where(x > 0, gy, gy.astype(f64) * slope)),
        "sigmoid": (lambda x: 1 / (1 + np.exp(-x.astype(f64))),
                    lambda y, gy: gy.astype(f64) * y * (1 - y.astype(f64))),
        "tanh": (lambda x: np.tanh(x.astype(f64)),
                 lambda y, gy: gy.astype(f64) * (1 - y.astype(f64) ** 2)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activation_forward_and_backward(where, name, dtype):
    slope = 0.02
    fwd_ref, bwd_ref = _act_refs(slope)[name]
    extra = (slope,) if name == "leaky_relu" else ()
    fwd = kernels.KERNELS["cuda"][name]
    bwd = kernels.KERNELS["cuda"][name + "_backward"]
    for n in SIZES:
        x = rand(n + 1, dtype, seed=n)
        gy = rand(n + 1, dtype, seed=n + 1)
        # whole arrays (16-byte aligned: vector path + tail) and views one element in
        # (misaligned: the scalar path)
        if not where.gpu:  # NumPy's allocations are 16-byte aligned, the views are not
            assert x.ctypes.data % 16 == 0 and x[1:].ctypes.data % 16 != 0
        for xs, gys in ((x[:n], gy[:n]), (x[1:], gy[1:])):
            y = where.get(fwd(where.put(xs), *extra))
            np.testing.assert_allclose(y, fwd_ref(xs), **tol(dtype))
            saved = xs if name == "leaky_relu" else y.astype(dtype)
            gx = where.get(bwd(where.put(saved), where.put(gys), *extra))
            assert gx.dtype == dtype and gx.shape == xs.shape
            np.testing.assert_allclose(gx, bwd_ref(saved, gys), **tol(dtype))


def test_activations_keep_shape_and_special_values(where):
    x = np.array([[-np.inf, -0.0, np.nan], [np.inf, -200.0, 200.0]], np.float32)
    np.testing.assert_array_equal(where.get(rc.activations.relu(where.put(x))),
                                  [[0, 0, np.nan], [np.inf, 0, 200]])
    s = where.get(rc.activations.sigmoid(where.put(x)))
    np.testing.assert_array_equal(s, [[0, 0.5, np.nan], [1, 0, 1]])  # no overflow NaN
    t = where.get(rc.activations.tanh(where.put(x)))
    np.testing.assert_array_equal(t, [[-1, -0.0, np.nan], [1, -1, 1]])
    scalar = np.array(-2.0)  # 0-d
    assert where.get(rc.activations.leaky_relu(where.put(scalar), 0.5)).shape == ()
    assert float(where.get(rc.activations.leaky_relu(where.put(scalar), 0.5))) == -1.0
    assert where.get(rc.activations.relu(where.put(np.zeros((0, 3), np.float32)))).shape == (0, 3)


def test_unsupported_dtypes_fall_back():
    assert rc.activations.relu(np.ones(3, np.int64)) is None
    assert rc.activations.sigmoid_backward(np.ones(3, np.float32), np.ones(3, np.float64)) is None
    assert rc.softmax.softmax(np.ones((2, 3), np.float16), 1) is None


# ---- softmax family -------------------------------------------------------------------------
def _softmax_ref(x, dim):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(dim, keepdims=True))
    return e / e.sum(dim, keepdims=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", EDGE_COLS)
def test_softmax_forward_backward_edge_columns(where, cols, dtype):
    x = rand((5, cols), dtype, seed=cols)
    gy = rand((5, cols), dtype, seed=cols + 7)
    p = _softmax_ref(x, 1)
    logp = np.log(p)

    y = where.get(rc.softmax.softmax(where.put(x), 1))
    np.testing.assert_allclose(y, p, **tol(dtype))
    ly = where.get(rc.softmax.log_softmax(where.put(x), -1))
    np.testing.assert_allclose(ly, logp, **tol(dtype))

    y_, ly_ = p.astype(dtype), logp.astype(dtype)
    gx = where.get(rc.softmax.softmax_backward(where.put(y_), where.put(gy), 1))
    y64, gy64 = y_.astype(np.float64), gy.astype(np.float64)
    np.testing.assert_allclose(gx, y64 * (gy64 - (gy64 * y64).sum(1, keepdims=True)),
                               **tol(dtype))
    lgx = where.get(rc.softmax.log_softmax_backward(where.put(ly_), where.put(gy), 1))
    np.testing.assert_allclose(lgx, gy64 - np.exp(ly_.astype(np.float64)) * gy64.sum(1, keepdims=True),
                               **tol(dtype))


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
def test_softmax_along_any_dim(where, dim):
    x = rand((4, 5, 6), np.float64, seed=3)
    y = where.get(rc.softmax.softmax(where.put(x), dim))
    assert y.shape == x.shape
    np.testing.assert_allclose(y, _softmax_ref(x, dim), rtol=1e-12)
    gy = rand((4, 5, 6), np.float64, seed=4)
    gx = where.get(rc.softmax.log_softmax_backward(where.put(np.log(y)), where.put(gy), dim))
    np.testing.assert_allclose(gx, gy - y * gy.sum(dim, keepdims=True), rtol=1e-11, atol=1e-12)


def test_softmax_extreme_values_match_torch(where):
    x = np.array([[1e4, 0.0, -1e4, 3.0],
                  [-np.inf, 1.0, -np.inf, 2.0],      # masked entries
                  [-np.inf, -np.inf, -np.inf, -np.inf],  # fully masked: NaN, as in torch
                  [np.nan, 0.0, 1.0, 2.0]], np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(where.get(rc.softmax.softmax(where.put(x), 1)),
                               torch.softmax(t, 1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(where.get(rc.softmax.log_softmax(where.put(x), 1)),
                               torch.log_softmax(t, 1).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [(32, 4, 1), (64, 1, 1), (256, 1, 1)])
def test_rows_are_grid_strided(block):
    # fewer blocks than rows: each team loops over several rows
    x = rand((13, 70), np.float32, seed=5)
    y = np.empty_like(x)
    launch("softmax.cu", "softmax_fwd<float>", 2, block, (x, y, np.int64(13), np.int32(70)))
    np.testing.assert_allclose(y, _softmax_ref(x, 1), rtol=2e-5, atol=1e-7)


def test_row_config_respects_the_launch_bounds():
    x = np.zeros(1, np.float32)
    for cols in [1, 32, 256, 257, 1000, 2047, 2048, 100_000]:
        grid, block = rc.launch.row_config(1000, cols, x)
        threads = block[0] * block[1]
        assert threads <= 512 and block[0] % 32 == 0  # GD_ROW_LAUNCH_BOUNDS; full warps
        assert block[1] == 1 or block[0] == 32
        assert grid >= 1


# ---- cross-entropy ----------------------------------------------------------------------------
def _ce_torch(logits, target, weight, ignore_index, smoothing):
    lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    tt = torch.tensor(target)
    losses = torch.nn.functional.cross_entropy(lt, tt, weight=w, ignore_index=ignore_index,
                                               label_smoothing=smoothing, reduction="none")
    losses.sum().backward()
    mean = torch.nn.functional.cross_entropy(lt.detach(), tt, weight=w, ignore_index=ignore_index,
                                             label_smoothing=smoothing, reduction="mean")
    return losses.detach().numpy(), lt.grad.numpy(), float(mean)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", EDGE_COLS)
def test_cross_entropy_matches_torch(where, cols, dtype):
    rng = np.random.default_rng(cols)
    n = 6
    logits = rand((n, cols), dtype, seed=cols)
    target = rng.integers(0, cols, size=n).astype(np.int64)
    target[1] = -100  # ignored
    for weighted in (False, True):
        weight = rng.uniform(0.2, 2.0, size=cols).astype(dtype) if weighted else None
        for smoothing in (0.0, 0.1):
            losses, dlogits = rc.cross_entropy.cross_entropy(
                where.put(logits), where.put(target),
                None if weight is None else where.put(weight), -100, smoothing)
            losses, dlogits = where.get(losses), where.get(dlogits)
            ref_l, ref_g, ref_mean = _ce_torch(logits, target, weight, -100, smoothing)
            assert losses.dtype == dtype and dlogits.shape == (n, cols)
            np.testing.assert_allclose(losses, ref_l, **tol(dtype))
            np.testing.assert_allclose(dlogits, ref_g, **tol(dtype))
            assert losses[1] == 0 and not dlogits[1].any()
            # the op's 'mean': divide by the weights of the rows not ignored
            w = np.ones(cols) if weight is None else weight.astype(np.float64)
            kept = target != -100
            np.testing.assert_allclose(losses.sum(dtype=np.float64) / w[target[kept]].sum(),
                                       ref_mean, **tol(dtype))


def test_cross_entropy_other_ignore_index_and_bad_targets(where):
    logits = rand((4, 5), np.float64, seed=1)
    target = np.array([2, 3, 3, 7])  # 3 ignored; 7 out of range
    losses, dl = rc.cross_entropy.cross_entropy(where.put(logits), where.put(target), None, 3, 0.0)
    losses, dl = where.get(losses), where.get(dl)
    ref_l, ref_g, _ = _ce_torch(logits[:1], target[:1], None, 3, 0.0)
    np.testing.assert_allclose(losses[0], ref_l[0], rtol=1e-12)
    np.testing.assert_allclose(dl[0], ref_g[0], rtol=1e-12)
    assert losses[1] == losses[2] == 0 and not dl[1:3].any()
    assert np.isnan(losses[3]) and np.isnan(dl[3]).all()  # a kernel cannot raise: NaN marks it


def test_cross_entropy_with_masked_logits_and_no_smoothing(where):
    logits = np.array([[0.0, -np.inf, 1.0], [2.0, 1.0, -np.inf]], np.float32)
    target = np.array([0, 1])
    losses, dl = rc.cross_entropy.cross_entropy(where.put(logits), where.put(target), None, -100, 0.0)
    ref_l, ref_g, _ = _ce_torch(logits.astype(np.float64), target, None, -100, 0.0)
    np.testing.assert_allclose(where.get(losses), ref_l, rtol=1e-6)
    np.testing.assert_allclose(where.get(dl), ref_g, rtol=1e-6, atol=1e-7)


# ---- short rows (cols <= 32): a thread per row on shared-memory tiles ------------------------
# Tiles are SMALL_ROW_THREADS[itemsize] rows (128 float, 64 double): row counts hit 1, a tile
# -1/+1, several tiles; columns hit 1, 2, odd/even strides, 31/32 and 33 (the warp kernel).
SHORT_COLS = [1, 2, 7, 10, 16, 31, 32, 33]


def _short_rows(dtype):
    r = rc.launch.SMALL_ROW_THREADS[np.dtype(dtype).itemsize]
    return [1, r - 1, r, r + 1, 3 * r + 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", SHORT_COLS)
def test_short_row_cross_entropy_matches_torch(where, cols, dtype, launched):
    names = launched
    for n in _short_rows(dtype):
        rng = np.random.default_rng(100 * cols + n)
        logits = rand((n, cols), dtype, seed=n + cols)
        target = rng.integers(0, cols, size=n).astype(np.int64)
        target[::7] = -100  # ignored rows spread over the tiles
        weight = rng.uniform(0.2, 2.0, size=cols).astype(dtype)
        for w, smoothing in ((None, 0.0), (weight, 0.1)):
            losses, dlogits = rc.cross_entropy.cross_entropy(where.put(logits), where.put(target),
                                               None if w is None else where.put(w), -100,
                                               smoothing)
            ref_l, ref_g, _ = _ce_torch(logits, target, w, -100, smoothing)
            np.testing.assert_allclose(where.get(losses), ref_l, **tol(dtype))
            np.testing.assert_allclose(where.get(dlogits), ref_g, **tol(dtype))
    small = cols <= rc.launch.SMALL_ROW_MAX_COLS
    assert names and all(name.startswith("cross_entropy_fwd_bwd_small<") == small
                         for name in names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", SHORT_COLS)
def test_short_row_softmax_forward_backward(where, cols, dtype, launched):
    names = launched
    for n in _short_rows(dtype):
        x = rand((n, cols), dtype, seed=n + cols)
        gy = rand((n, cols), dtype, seed=n + cols + 1)
        p = _softmax_ref(x, 1)
        np.testing.assert_allclose(where.get(rc.softmax.softmax(where.put(x), 1)), p, **tol(dtype))
        np.testing.assert_allclose(where.get(rc.softmax.log_softmax(where.put(x), 1)), np.log(p),
                                   **tol(dtype))
        y64 = p.astype(dtype).astype(np.float64)
        g64 = gy.astype(np.float64)
        gx = rc.softmax.softmax_backward(where.put(p.astype(dtype)), where.put(gy), 1)
        np.testing.assert_allclose(where.get(gx), y64 * (g64 - (g64 * y64).sum(1, keepdims=True)),
                                   **tol(dtype))
        ly = np.log(p).astype(dtype)
        lgx = rc.softmax.log_softmax_backward(where.put(ly), where.put(gy), 1)
        np.testing.assert_allclose(
            where.get(lgx), g64 - np.exp(ly.astype(np.float64)) * g64.sum(1, keepdims=True),
            **tol(dtype))
    small = cols <= rc.launch.SMALL_ROW_MAX_COLS
    assert names and all(name.split("<")[0].endswith("_small") == small for name in names)


def test_short_row_special_rows(where):
    # masked logits, an all -inf row (NaN, as torch), NaN, ignore_index and an out-of-range
    # target inside one tile
    x = np.array([[0.0, -np.inf, 1.0], [2.0, 1.0, -np.inf], [-np.inf] * 3, [np.nan, 0.0, 1.0],
                  [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(where.get(rc.softmax.softmax(where.put(x), 1)), torch.softmax(t, 1),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(where.get(rc.softmax.log_softmax(where.put(x), 1)),
                               torch.log_softmax(t, 1), rtol=1e-6, atol=1e-7)
    target = np.array([0, 1, -100, -100, 5, 2])
    losses, dl = rc.cross_entropy.cross_entropy(where.put(x), where.put(target), None, -100, 0.0)
    losses, dl = where.get(losses), where.get(dl)
    ref_l, ref_g, _ = _ce_torch(x[[0, 1, 5]].astype(np.float64), target[[0, 1, 5]], None, -100,
                                0.0)
    np.testing.assert_allclose(losses[[0, 1, 5]], ref_l, rtol=1e-6)
    np.testing.assert_allclose(dl[[0, 1, 5]], ref_g, rtol=1e-6, atol=1e-7)
    assert losses[2] == losses[3] == 0 and not dl[2:4].any()
    assert np.isnan(losses[4]) and np.isnan(dl[4]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_row_tiles_are_grid_strided(dtype):
    # fewer blocks than tiles: each block loops over several tiles, reusing its shared memory
    itemsize = np.dtype(dtype).itemsize
    n, cols = 7 * rc.launch.SMALL_ROW_THREADS[itemsize] + 3, 10
    x = rand((n, cols), dtype, seed=9)
    target = np.random.default_rng(9).integers(0, cols, size=n).astype(np.int64)
    w = np.linspace(0.5, 1.5, cols).astype(dtype)
    losses, dl = np.empty(n, dtype), np.empty_like(x)
    _, block, shared = rc.launch.small_row_config(n, cols, itemsize, 1, cols, x)
    t = "float" if dtype == np.float32 else "double"
    for order in ("forward", "reverse", "random"):
        with emulator(order=order, seed=3, shuffle_blocks=True):
            launch("cross_entropy.cu", f"cross_entropy_fwd_bwd_small<{t}>", 2, block,
                   (x, target, w, losses, dl, np.int64(n), np.int32(cols), np.int64(-100),
                    dtype(0.05)), shared)
        ref_l, ref_g, _ = _ce_torch(x, target, w, -100, 0.05)
        np.testing.assert_allclose(losses, ref_l, **tol(dtype))
        np.testing.assert_allclose(dl, ref_g, **tol(dtype))
        y = np.empty_like(x)
        _, block2, shared2 = rc.launch.small_row_config(n, cols, itemsize, 1, 0, x)
        with emulator(order=order, seed=4, shuffle_blocks=True):
            launch("softmax.cu", f"log_softmax_fwd_small<{t}>", 3, block2,
                   (x, y, np.int64(n), np.int32(cols)), shared2)
        np.testing.assert_allclose(y, np.log(_softmax_ref(x, 1)), **tol(dtype))


def test_small_row_config_fits_shared_memory():
    x = np.zeros(1, np.float32)
    for itemsize in (4, 8):
        for cols in (1, 10, rc.launch.SMALL_ROW_MAX_COLS):
            grid, block, shared = rc.launch.small_row_config(10_000, cols, itemsize, 2, cols, x)
            assert block[0] % 32 == 0 and block[0] <= 512 and grid >= 1
            assert shared <= 48 * 1024  # no opt-in needed for dynamic shared memory
