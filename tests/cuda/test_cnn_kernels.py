"""The CNN kernels of the 'cuda' table (gpudiff/runtime/cuda/{conv,im2col,pool,batch_norm,optim}.py, csrc/cuda/{conv,im2col,
pool,batch_norm,optim}.cu) against PyTorch (float64 oracle), the CPU reference, and themselves.

Every kernel test runs in the emulator with the threads between sync points in forward,
reverse and random order, and with random thread order plus shuffled block order (the
``order`` fixture), and on a real GPU when there is one (marked ``gpu``). The emulator checks
every access against the array's bounds and every array's guard zones after each launch, so
each test is also an out-of-bounds test. Shapes sit on the tile edges of the implicit GEMM
(16 and 64 rows, 64 columns, 8 and 16 deep) and the chunk / channel-tile edges of the other
kernels; emulated shapes stay small (the file runs in about a minute on 2 cores).
"""
import importlib

import numpy as np
import pytest
import torch

from gpudiff import geometry
from gpudiff.runtime import cuda as rc
from gpudiff.runtime import kernels
from gpudiff.runtime.cuda import launch as cuda_launch

F = torch.nn.functional
ALGOS = ["implicit_gemm", "im2col", "direct"]


def gpu_available():
    try:
        return importlib.import_module("cupy").cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device
        return False


class Emulated:
    """Arrays stay NumPy: the kernels run in the emulator."""

    def put(self, a):
        return np.array(a, order="C")

    def get(self, a):
        return np.asarray(a)


class OnGPU:
    """Arrays go to the GPU: the kernels run there (NVRTC)."""

    def __init__(self):
        self.cupy = importlib.import_module("cupy")

    def put(self, a):
        return self.cupy.asarray(a)

    def get(self, a):
        return self.cupy.asnumpy(a)


ORDERS = [
    ("forward", False), ("reverse", False), ("random", False), ("random", True),
]


@pytest.fixture(params=[f"{o}{'+shuffled-blocks' if s else ''}" for o, s in ORDERS]
                + [pytest.param("gpu", marks=pytest.mark.gpu)])
def order(request):
    """Where the kernels run: an emulator thread/block order, or a real GPU."""
    if request.param == "gpu":
        if not gpu_available():
            pytest.skip("needs CuPy and an NVIDIA GPU")
        yield OnGPU()
        return
    o, _, shuffled = request.param.partition("+")
    with cuda_launch.emulator(order=o, seed=7, shuffle_blocks=bool(shuffled)):
        yield Emulated()


@pytest.fixture(autouse=True)
def fp32_convolutions():
    """These tests check the FP32 kernels (conv.cu) at float32 tolerances: TF32 off, as
    ``gpudiff.backends.cudnn.allow_tf32 = False`` does (its default True would send float32
    implicit-GEMM convolutions to the TF32 tensor cores, tested in test_tensor_core.py)."""
    with rc.conv.use_tf32(False):
        yield


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-11)


def rand(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def t64(a):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=True)


# ================================ convolution ================================================
# (x shape, w shape, stride, padding, dilation, groups, bias)
CONV_CASES = {
    "basic": ((2, 3, 7, 9), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    "stride-dilation-rect": ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2, False),
    "stride3-pad2": ((1, 5, 11, 10), (7, 5, 5, 3), (3, 2), (2, 1), (1, 1), 1, True),
    "depthwise": ((2, 6, 8, 7), (6, 1, 3, 3), (1, 1), (1, 1), (1, 1), 6, True),
    "depthwise-x2": ((1, 4, 9, 9), (8, 1, 3, 3), (2, 2), (1, 1), (2, 1), 4, False),
    "pointwise": ((2, 9, 5, 4), (17, 9, 1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    "1x1-stride2": ((2, 8, 7, 7), (5, 8, 1, 1), (2, 2), (0, 0), (1, 1), 1, False),
    "grouped-wide": ((1, 34, 6, 5), (66, 17, 3, 3), (1, 1), (1, 1), (1, 1), 2, True),
    "kernel-bigger-than-pad": ((1, 2, 5, 5), (3, 2, 5, 5), (1, 1), (0, 0), (1, 1), 1, True),
}
SPLIT_CASE = ((2, 3, 9, 10), (5, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, False)  # N*OH*OW = 180


def _cheap(case, algo):
    """Direct wgrad runs a block per weight element: keep the emulated ones small."""
    ws = CONV_CASES[case][1]
    return algo != "direct" or ws[0] * ws[1] * ws[2] * ws[3] <= 1000


def conv_reference(case, dtype, seed=0):
    """Inputs and PyTorch's float64 forward and gradients."""
    xs, ws, stride, pad, dil, groups, has_bias = SPLIT_CASE if case == "split" \
        else CONV_CASES[case]
    x, w = rand(xs, dtype, seed), rand(ws, dtype, seed + 1)
    b = rand(ws[0], dtype, seed + 2) if has_bias else None
    tx, tw = t64(x), t64(w)
    tb = t64(b) if has_bias else None
    ty = F.conv2d(tx, tw, tb, stride, pad, dil, groups)
    gy = rand(tuple(ty.shape), dtype, seed + 3)
    ty.backward(torch.tensor(gy, dtype=torch.float64))
    ref = (ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy())
    return (x, w, b, gy, stride, pad, dil, groups), ref


def run_conv(where, inputs):
    x, w, b, gy, stride, pad, dil, groups = inputs
    put, get = where.put, where.get
    y = rc.conv.conv2d(put(x), put(w), None if b is None else put(b), stride, pad, dil, groups)
    gx = rc.conv.conv2d_backward_input(put(gy), put(w), x.shape, stride, pad, dil, groups)
    gw = rc.conv.conv2d_backward_weight(put(gy), put(x), w.shape, stride, pad, dil, groups)
    return get(y), get(gx), get(gw)


@pytest.mark.parametrize("case,algo", [(c, a) for c in sorted(CONV_CASES) for a in ALGOS
                                       if _cheap(c, a)])
def test_conv2d_all_passes_match_torch(order, case, algo):
    inputs, ref = conv_reference(case, np.float32)
    with rc.conv.use_conv_algorithm(algo):
        got = run_conv(order, inputs)
    assert rc.conv.last_conv_algorithm == {"forward": algo, "backward_input": algo,
                                      "backward_weight": algo}
    for g, r, what in zip(got, ref, ("y", "gx", "gw")):
        assert g.dtype == np.float32 and g.shape == r.shape, what
        np.testing.assert_allclose(g, r, **tol(np.float32), err_msg=what)


@pytest.mark.parametrize("case,algo", [
    (c, a) for c in ("basic", "stride-dilation-rect", "depthwise-x2", "grouped-wide")
    for a in ALGOS if _cheap(c, a)])
def test_conv2d_float64(case, algo):
    inputs, ref = conv_reference(case, np.float64)
    with rc.conv.use_conv_algorithm(algo):
        got = run_conv(Emulated(), inputs)
    for g, r, what in zip(got, ref, ("y", "gx", "gw")):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, r, **tol(np.float64), err_msg=what)


# GEMM sizes on every tile edge: rows (K for forward/wgrad, C for dgrad) around the small
# tile (16) and the large one (64), columns (N*OH*OW, or N*H*W) around 64, depth
# (C*KH*KW, or K*KH*KW) around 8 and 16.
EDGE_ROWS = [1, 15, 16, 17, 63, 64, 65]
EDGE_SPATIAL = [(7, 9), (8, 8), (5, 13), (1, 1)]  # 63, 64, 65, 1 output positions (k=1)
EDGE_DEPTH = [7, 8, 9, 15, 16, 17, 31]


@pytest.mark.parametrize("rows", EDGE_ROWS)
def test_implicit_gemm_row_edges(rows):
    # forward and wgrad rows = K, dgrad rows = C: both swept
    for (k, c) in ((rows, 3), (3, rows)):
        x, w = rand((1, c, 8, 8)), rand((k, c, 3, 3), seed=1)
        gy = rand((1, k, 8, 8), seed=2)
        tx, tw = t64(x), t64(w)
        ty = F.conv2d(tx, tw, None, 1, 1)
        ty.backward(torch.tensor(gy))
        with rc.conv.use_conv_algorithm("implicit_gemm"):
            got = run_conv(Emulated(), (x, w, None, gy, 1, 1, 1, 1))
        for g, r in zip(got, (ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy())):
            np.testing.assert_allclose(g, r, **tol(np.float64))


@pytest.mark.parametrize("depth", EDGE_DEPTH)
@pytest.mark.parametrize("spatial", EDGE_SPATIAL)
def test_implicit_gemm_column_and_depth_edges(order, spatial, depth):
    # 1x1 kernel: depth = C (forward), K (dgrad); columns = H*W
    h, w_ = spatial
    x, w = rand((1, depth, h, w_)), rand((5, depth, 1, 1), seed=1)
    gy = rand((1, 5, h, w_), seed=2)
    tx, tw = t64(x), t64(w)
    ty = F.conv2d(tx, tw)
    ty.backward(torch.tensor(gy))
    with rc.conv.use_conv_algorithm("implicit_gemm"):
        got = run_conv(order, (x, w, None, gy, 1, 0, 1, 1))
    for g, r in zip(got, (ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy())):
        np.testing.assert_allclose(g, r, **tol(np.float64))


@pytest.mark.parametrize("min_chunk", [8, 16, 40])
def test_wgrad_split_reduction(order, min_chunk, monkeypatch):
    # force the N*OH*OW reduction over several blocks (chunks on and off the BK edges);
    # the partial tiles are summed by the second kernel
    monkeypatch.setattr(rc.conv, "WGRAD_MIN_CHUNK", min_chunk)
    inputs, ref = conv_reference("split", np.float64)
    geom = geometry.ConvGeom(inputs[0].shape, inputs[1].shape, *inputs[4:8])
    splits, chunk = rc.conv.wgrad_splits(geom, inputs[0])
    assert splits > 1 and chunk % rc.conv._tile(geom.Kg)[2] == 0
    with rc.conv.use_conv_algorithm("implicit_gemm"):
        gw = order.get(rc.conv.conv2d_backward_weight(order.put(inputs[3]), order.put(inputs[0]),
                                                 inputs[1].shape, *inputs[4:8]))
    np.testing.assert_allclose(gw, ref[2], **tol(np.float64))


@pytest.mark.parametrize("algo", ALGOS)
def test_conv_backward_is_bitwise_reproducible(algo):
    # different thread and block schedules, same bits: no atomics, fixed reduction orders
    x, w, gy = rand((2, 12, 16, 16)), rand((20, 12, 3, 3), seed=1), rand((2, 20, 16, 16), seed=2)
    if algo == "direct":  # a block per weight element: keep it small in the emulator
        x, w, gy = x[:, :3, :8, :8].copy(), w[:4, :3].copy(), gy[:, :4, :8, :8].copy()
    geom = geometry.ConvGeom(x.shape, w.shape, 1, 1, 1, 1)
    if algo == "implicit_gemm":
        assert rc.conv.wgrad_splits(geom, x)[0] > 1  # the split reduction is part of the check
    runs = []
    for seed in (1, 2):
        with cuda_launch.emulator(order="random", seed=seed, shuffle_blocks=True), \
                rc.conv.use_conv_algorithm(algo):
            runs.append((rc.conv.conv2d_backward_input(gy, w, x.shape, 1, 1, 1, 1),
                         rc.conv.conv2d_backward_weight(gy, x, w.shape, 1, 1, 1, 1)))
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


def test_auto_algorithm_choice_and_log():
    geoms = {
        "depthwise": geometry.ConvGeom((8, 32, 16, 16), (32, 1, 3, 3), 1, 1, 1, 32),
        "pointwise": geometry.ConvGeom((8, 32, 16, 16), (64, 32, 1, 1), 1, 0, 1, 1),
        "lenet-conv1": geometry.ConvGeom((64, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1, 1),
        "resnet-3x3": geometry.ConvGeom((64, 64, 8, 8), (64, 64, 3, 3), 1, 1, 1, 1),
        "wide-3x3": geometry.ConvGeom((64, 256, 8, 8), (256, 256, 3, 3), 1, 1, 1, 1),
    }
    got = {k: rc.conv.choose_conv_algorithm(g) for k, g in geoms.items()}
    assert got == {"depthwise": "direct", "pointwise": "im2col", "lenet-conv1": "implicit_gemm",
                   "resnet-3x3": "implicit_gemm", "wide-3x3": "im2col"}
    rc.conv.reset_conv_log()
    x, w = rand((1, 4, 5, 5)), rand((4, 1, 3, 3), seed=1)
    rc.conv.conv2d(x, w, None, 1, 1, 1, 4)
    assert rc.conv.last_conv_algorithm == {"forward": "direct"}
    assert rc.conv.conv_algorithm_counts[("forward", "direct")] == 1
    old = rc.conv.conv_algorithm
    try:
        rc.conv.conv_algorithm = "im2col"  # the module setting forces a path
        rc.conv.conv2d(x, w, None, 1, 1, 1, 4)
        assert rc.conv.last_conv_algorithm["forward"] == "im2col"
        rc.conv.conv_algorithm = "winograd"
        with pytest.raises(ValueError, match="conv_algorithm"):
            rc.conv.conv2d(x, w, None, 1, 1, 1, 4)
    finally:
        rc.conv.conv_algorithm = old
    with pytest.raises(ValueError), rc.conv.use_conv_algorithm("fft"):
        pass


def test_conv_declines_what_it_does_not_handle():
    x, w = rand((1, 2, 5, 5)), rand((3, 2, 3, 3), seed=1)
    # (float16 / bfloat16 run on the tensor cores: test_tensor_core.py)
    assert rc.conv.conv2d(x.astype(np.int32), w.astype(np.int32), None, 1, 0, 1, 1) is None
    assert rc.conv.conv2d(x.astype(np.float16), w.astype(np.float32), None, 1, 0, 1, 1) is None
    assert rc.conv.conv2d(x, w.astype(np.float32), None, 1, 0, 1, 1) is None  # mixed dtypes
    assert rc.conv.conv2d(x, w, None, 1, 0, 1, 2) is None  # C != Cg * groups
    assert rc.conv.conv2d(x, rand((3, 2, 7, 7)), None, 1, 0, 1, 1) is None  # output < 1
    # empty batch: an empty result, no launch
    assert rc.conv.conv2d(x[:0], w, None, 1, 0, 1, 1).shape == (0, 3, 3, 3)


def test_im2col_and_col2im_entries_match_the_reference():
    from gpudiff.ops.conv import col2im_ref, im2col_ref
    x = rand((2, 3, 7, 6))
    geo = (3, 2, 2, 1, 1, 0, 1, 2)  # kh kw sh sw ph pw dh dw
    cols = rc.im2col.im2col(x, *geo)
    np.testing.assert_array_equal(cols, im2col_ref(np, x, *geo))
    back = rc.im2col.col2im(cols, 3, 7, 6, *geo)
    np.testing.assert_allclose(back, col2im_ref(np, cols, 3, 7, 6, *geo), rtol=1e-14, atol=1e-14)


def test_kernel_guard_catches_an_undersized_output():
    # the emulator's bounds checks apply to our kernels: an output one element short fails
    # with the kernel's name instead of writing past the array
    host = importlib.import_module("gpudiff._cuda_host")
    x, w, b = rand((1, 1, 4, 4)), rand((1, 1, 3, 3)), np.zeros(1)
    y = np.empty(3)  # needs 4
    geom = geometry.ConvGeom(x.shape, w.shape, 1, 0, 1, 1)
    with pytest.raises(host.KernelError, match="conv2d_fwd_direct"):
        cuda_launch.launch("conv.cu", "conv2d_fwd_direct<double>", 1, 32,
                           (x, w, b, y) + rc.launch.i32(*geom.kernel_args()) + (np.int32(1),))


def test_every_name_the_wrappers_use_is_listed():
    # the NVRTC test (test_cuda_nvrtc.py) compiles exactly the listed names
    listed = set(cuda_launch.name_expressions("conv.cu"))
    for t in ("float", "double"):
        for tile in (rc.conv.TILE_L, rc.conv.TILE_S):
            for k in ("conv2d_fwd_igemm", "conv2d_dgrad_igemm", "conv2d_wgrad_igemm"):
                assert rc.conv._igemm_name(k, t, tile) in listed


# ---- conv ops on the emulated cuda device vs the CPU device -----------------------------------
@pytest.mark.parametrize("case", ["basic", "depthwise", "pointwise", "stride-dilation-rect"])
def test_conv_op_on_cuda_matches_cpu(case):
    import gpudiff
    import gpudiff.nn.functional as gF
    xs, ws, stride, pad, dil, groups, has_bias = CONV_CASES[case]
    x, w, b = rand(xs, np.float32), rand(ws, np.float32, 1), rand(ws[0], np.float32, 2)
    out = {}
    for dev in ("cpu", "cuda"):
        tx = gpudiff.tensor(x, device=dev, requires_grad=True)
        tw = gpudiff.tensor(w, device=dev, requires_grad=True)
        tb = gpudiff.tensor(b, device=dev, requires_grad=True) if has_bias else None
        y = gF.conv2d(tx, tw, tb, stride, pad, dil, groups)
        (y * y).sum().backward()
        out[dev] = [y.detach().cpu().numpy(), tx.grad.cpu().numpy(), tw.grad.cpu().numpy()]
        if has_bias:
            out[dev].append(tb.grad.cpu().numpy())
    for a, c in zip(out["cuda"], out["cpu"]):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_conv_transpose2d_op_on_cuda_matches_torch():
    import gpudiff
    import gpudiff.nn.functional as gF
    x, w, b = rand((2, 4, 5, 6), np.float32), rand((4, 3, 3, 2), np.float32, 1), \
        rand(6, np.float32, 2)
    kw = dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2, dilation=(1, 2))
    rc.conv.reset_conv_log()
    tx = gpudiff.tensor(x, device="cuda", requires_grad=True)
    tw = gpudiff.tensor(w, device="cuda", requires_grad=True)
    tb = gpudiff.tensor(b, device="cuda", requires_grad=True)
    y = gF.conv_transpose2d(tx, tw, tb, **kw)
    (y * y).sum().backward()
    # the transposed conv ran as conv2d's input gradient, its backward as forward + wgrad
    assert set(rc.conv.last_conv_algorithm) == {"forward", "backward_input", "backward_weight"}
    rx, rw, rb = t64(x), t64(w), t64(b)
    ry = F.conv_transpose2d(rx, rw, rb, **kw)
    (ry * ry).sum().backward()
    np.testing.assert_allclose(y.detach().cpu().numpy(), ry.detach().numpy(), rtol=1e-4,
                               atol=1e-4)
    for g, r in ((tx, rx), (tw, rw), (tb, rb)):
        np.testing.assert_allclose(g.grad.cpu().numpy(), r.grad.numpy(), rtol=1e-4, atol=1e-3)


# ================================ pooling ====================================================
# (shape, kernel, stride, padding, dilation, ceil_mode)
POOL_CASES = [
    ((2, 3, 9, 11), (3, 2), (2, 1), (1, 1), (1, 2), False),
    ((2, 2, 7, 7), (2, 2), (2, 2), (0, 0), (1, 1), True),
    ((1, 2, 8, 7), (3, 2), (2, 2), (1, 1), (1, 1), True),
    ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1), False),
    ((2, 3, 13, 5), (5, 3), (3, 2), (2, 1), (1, 1), False),
    # 2x2 stride 2 on even widths: the pair-load path (odd height: ceil_mode clips rows)
    ((2, 3, 6, 8), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ((1, 2, 7, 8), (2, 2), (2, 2), (0, 0), (1, 1), True),
    # LeNet's 10-wide planes; pair windows three rows high with row padding (avg: two lanes
    # per output, odd row counts)
    ((3, 2, 10, 10), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ((2, 3, 9, 6), (3, 2), (2, 2), (1, 0), (1, 1), True),
]


def _pool_input(shape, seed=0):
    x = rand(shape, seed=seed)
    x[0, 0, 0, :2] = 0.5  # a tie in the first window
    if x.size > 8:
        x.flat[5] = np.nan  # a NaN wins its windows
    return x


@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_max_pool2d_forward_backward(order, case):
    shape, k, s, p, d, ceil = POOL_CASES[case]
    x = _pool_input(shape)
    tx = t64(x)
    ty, ti = F.max_pool2d(tx, k, s, p, d, ceil, return_indices=True)
    gy = rand(tuple(ty.shape), seed=1)
    ty.backward(torch.tensor(gy))
    y, idx = rc.pool.max_pool2d(order.put(x), *k, *s, *p, *d, ceil)
    np.testing.assert_array_equal(order.get(idx), ti.numpy())
    np.testing.assert_array_equal(order.get(y), ty.detach().numpy())  # NaNs in place too
    H, W = shape[2:]
    gx_geom = rc.pool.max_pool2d_with_indices_backward(order.put(gy), idx, H, W, *k, *s, *p, *d)
    gx_any = rc.pool.max_pool2d_backward(order.put(gy), idx, H, W)  # no geometry: all candidates
    np.testing.assert_allclose(order.get(gx_geom), tx.grad.numpy(), rtol=1e-14, atol=1e-14)
    assert order.get(gx_any).tobytes() == order.get(gx_geom).tobytes()


@pytest.mark.parametrize("case", [c for c in range(len(POOL_CASES))
                                  if POOL_CASES[c][4] == (1, 1)])
@pytest.mark.parametrize("count_include_pad,divisor", [(True, None), (False, None), (True, 5)])
def test_avg_pool2d_forward_backward(order, case, count_include_pad, divisor):
    shape, k, s, p, _, ceil = POOL_CASES[case]
    x = rand(shape)
    tx = t64(x)
    ty = F.avg_pool2d(tx, k, s, p, ceil, count_include_pad, divisor)
    gy = rand(tuple(ty.shape), seed=1)
    ty.backward(torch.tensor(gy))
    y = rc.pool.avg_pool2d(order.put(x), *k, *s, *p, ceil, count_include_pad, divisor)
    gx = rc.pool.avg_pool2d_backward(order.put(gy), *shape[2:], *k, *s, *p, ceil,
                                count_include_pad, divisor)
    np.testing.assert_allclose(order.get(y), ty.detach().numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), rtol=1e-13, atol=1e-14)


# (shape, kernel, stride, padding, ceil_mode): outputs not a multiple of a warp's 16, LeNet's
# two pools, 3-row windows, row padding, ceil_mode's clipped last row
PAIR_CASES = [((1, 1, 2, 2), (2, 2), (2, 2), (0, 0), False),
              ((2, 6, 28, 28), (2, 2), (2, 2), (0, 0), False),
              ((5, 16, 10, 10), (2, 2), (2, 2), (0, 0), False),
              ((3, 5, 11, 14), (3, 2), (2, 2), (1, 0), True),
              ((2, 3, 7, 6), (2, 2), (1, 2), (1, 0), True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(PAIR_CASES)))
def test_avg_pool2d_pair_windows_two_lanes_per_output(order, case, dtype, launched):
    # the pair kernel runs, matches torch, and equals the one-lane kernel bit for bit (same
    # summation order); a misaligned input (a view one element in) takes the one-lane kernel
    shape, k, s, p, ceil = PAIR_CASES[case]
    x = rand(shape, dtype, seed=case)
    ref = F.avg_pool2d(t64(x), k, s, p, ceil, False).detach().numpy()
    names = launched
    y = order.get(rc.pool.avg_pool2d(order.put(x), *k, *s, *p, ceil, False, None))
    assert names == [f"avg_pool2d_fwd_pairs<{'float' if dtype == np.float32 else 'double'}>"]
    np.testing.assert_allclose(y, ref, **tol(dtype))
    if isinstance(order, Emulated):
        buf = np.empty(x.size + 1, dtype)
        xm = buf[1:].reshape(shape)
        xm[...] = x
        ym = rc.pool.avg_pool2d(xm, *k, *s, *p, ceil, False, None)
        assert names[-1].startswith("avg_pool2d_fwd<")
        assert ym.tobytes() == y.tobytes()


def test_avg_pool2d_pairs_grid_strided():
    # fewer threads than outputs x 2: every warp loops, its 16 outputs a step apart
    x = rand((3, 4, 10, 10), np.float32, seed=3)
    y = np.empty((3, 4, 5, 5), np.float32)
    ref = F.avg_pool2d(torch.from_numpy(x), 2, 2).numpy()
    for o, shuffled in ORDERS:
        y[...] = np.nan
        with cuda_launch.emulator(order=o, seed=5, shuffle_blocks=shuffled):
            rc.launch.launch("pool.cu", "avg_pool2d_fwd_pairs<float>", 3, 64,
                      (x, y, np.int64(12)) + rc.launch.i32(10, 10, 5, 5, 2, 2, 0, True)
                      + (np.int64(0),))
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)


# (input H, W) -> (output H, W): shrinking, equal, growing, to 1x1
# (the last two: windows of >= 16 elements, the warp-per-output forward)
ADAPTIVE_CASES = [((9, 11), (4, 5)), ((5, 7), (5, 7)), ((3, 4), (7, 5)), ((6, 13), (1, 1)),
                  ((17, 9), (2, 1))]


@pytest.mark.parametrize("hw,out", ADAPTIVE_CASES)
def test_adaptive_pools_forward_backward(order, hw, out):
    x = rand((2, 3) + hw)
    tx = t64(x)
    ty, ti = F.adaptive_max_pool2d(tx, out, return_indices=True)
    gy = rand(tuple(ty.shape), seed=1)
    ty.backward(torch.tensor(gy))
    y, idx = rc.pool.adaptive_max_pool2d(order.put(x), *out)
    gx = rc.pool.adaptive_max_pool2d_backward(order.put(gy), idx, *hw)
    np.testing.assert_array_equal(order.get(idx), ti.numpy())
    np.testing.assert_array_equal(order.get(y), ty.detach().numpy())
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), rtol=1e-14, atol=1e-14)

    tx = t64(x)
    ty = F.adaptive_avg_pool2d(tx, out)
    ty.backward(torch.tensor(gy))
    y = rc.pool.adaptive_avg_pool2d(order.put(x), *out)
    gx = rc.pool.adaptive_avg_pool2d_backward(order.put(gy), *hw)
    np.testing.assert_allclose(order.get(y), ty.detach().numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), rtol=1e-13, atol=1e-14)


def test_pools_match_the_cpu_kernels_and_unbatched_input():
    cpu = kernels.KERNELS["cpu"]
    if "max_pool2d" not in cpu:
        pytest.skip("gpudiff._C (CPU kernels) not built")
    x = rand((3, 10, 9), np.float32)  # unbatched (C, H, W)
    geo = (3, 3, 2, 2, 1, 1, 1, 1)
    y, idx = rc.pool.max_pool2d(x, *geo, True)
    yc, ic = cpu["max_pool2d"](x, *geo, True)
    np.testing.assert_array_equal(y, yc)
    np.testing.assert_array_equal(idx, ic)
    gy = rand(y.shape, np.float32, 1)
    np.testing.assert_allclose(rc.pool.max_pool2d_with_indices_backward(gy, idx, 10, 9, *geo),
                               cpu["max_pool2d_backward"](gy, idx, 10, 9), rtol=1e-6)
    a = rc.pool.avg_pool2d(x, 3, 2, 2, 1, 1, 0, True, False, None)
    np.testing.assert_allclose(a, cpu["avg_pool2d"](x, 3, 2, 2, 1, 1, 0, True, False, None),
                               rtol=1e-6)


@pytest.mark.parametrize("kind", ["max", "avg", "adaptive_max", "adaptive_avg"])
def test_pool_backward_is_bitwise_reproducible(kind):
    x = rand((2, 3, 12, 11))
    runs = []
    for seed in (1, 2):
        with cuda_launch.emulator(order="random", seed=seed, shuffle_blocks=True):
            if kind == "max":  # overlapping windows: inputs gather several outputs
                y, idx = rc.pool.max_pool2d(x, 3, 3, 1, 1, 1, 1, 1, 1, False)
                g = rc.pool.max_pool2d_with_indices_backward(np.ones_like(y), idx, 12, 11,
                                                        3, 3, 1, 1, 1, 1, 1, 1)
            elif kind == "avg":
                g = rc.pool.avg_pool2d_backward(rand((2, 3, 12, 11), seed=3), 12, 11, 3, 3, 1, 1,
                                           1, 1, False, True, None)
            elif kind == "adaptive_max":
                y, idx = rc.pool.adaptive_max_pool2d(x, 5, 7)
                g = rc.pool.adaptive_max_pool2d_backward(rand(y.shape, seed=3), idx, 12, 11)
            else:
                g = rc.pool.adaptive_avg_pool2d_backward(rand((2, 3, 5, 7), seed=3), 12, 11)
            runs.append(g)
    assert runs[0].tobytes() == runs[1].tobytes()


# ================================ batch norm =================================================
# (N, C) tiles of 32 channels: 1, 31, 32, 33; planes: small and block-edge sizes
BN_SHAPES = [(5, 1), (3, 31), (4, 32), (2, 33), (4, 3, 5, 6), (1, 2, 3, 3), (7, 3, 11),
             (2, 2, 16, 8)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_training_forward_backward(order, shape, dtype):
    c = shape[1]
    x = (rand(shape, dtype) * 3 + 10).astype(dtype)  # offset mean: a naive E[x^2] would lose digits
    w, b = rand(c, dtype, 1), rand(c, dtype, 2)
    rm, rv = rand(c, dtype, 3), (np.abs(rand(c, dtype, 4)) + 0.5).astype(dtype)
    trm, trv = torch.tensor(rm, dtype=torch.float64), torch.tensor(rv, dtype=torch.float64)
    tx, tw, tb = t64(x), t64(w), t64(b)
    ty = F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
    gy = rand(shape, dtype, 5)
    ty.backward(torch.tensor(gy, dtype=torch.float64))
    rm_d, rv_d = order.put(rm), order.put(rv)
    y, mean, invstd = rc.batch_norm.batch_norm_forward(order.put(x), order.put(w), order.put(b), rm_d,
                                            rv_d, True, 0.1, 1e-5)
    gx, gw, gb = rc.batch_norm.batch_norm_backward(order.put(gy), order.put(x), order.put(w), mean,
                                        invstd)
    t = tol(dtype)
    np.testing.assert_allclose(order.get(y), ty.detach().numpy(), **t)
    np.testing.assert_allclose(order.get(rm_d), trm.numpy(), **t)  # updated in place
    np.testing.assert_allclose(order.get(rv_d), trv.numpy(), **t)
    xr = x.astype(np.float64).swapaxes(0, 1).reshape(c, -1)
    np.testing.assert_allclose(order.get(mean), xr.mean(1), **t)
    np.testing.assert_allclose(order.get(invstd), 1 / np.sqrt(xr.var(1) + 1e-5), **t)
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), **t)
    np.testing.assert_allclose(order.get(gw), tw.grad.numpy(), **t)
    np.testing.assert_allclose(order.get(gb), tb.grad.numpy(), **t)


@pytest.mark.parametrize("cache_bytes", [0, 40, 4 * 7 * 13])
def test_batch_norm_shared_memory_cache(order, cache_bytes, monkeypatch):
    # none, some (the walk's first values) or all of a channel kept between the passes
    monkeypatch.setattr(rc.batch_norm, "BN_CACHE_BYTES", cache_bytes)
    x, gy, w = (rand((7, 2, 13)) * 2 + 5), rand((7, 2, 13), seed=1), rand(2, seed=2)
    tx, tw = t64(x), t64(w)
    ty = F.batch_norm(tx, None, None, tw, None, True, 0.1, 1e-5)
    ty.backward(torch.tensor(gy))
    y, m, s = rc.batch_norm.batch_norm_forward(order.put(x), order.put(w), None, None, None, True, 0.1,
                                    1e-5)
    gx, gw, _ = rc.batch_norm.batch_norm_backward(order.put(gy), order.put(x), order.put(w), m, s)
    np.testing.assert_allclose(order.get(y), ty.detach().numpy(), **tol(np.float64))
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), **tol(np.float64))
    np.testing.assert_allclose(order.get(gw), tw.grad.numpy(), **tol(np.float64))


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 5)])
def test_batch_norm_eval_and_no_affine(order, shape):
    c = shape[1]
    x, w, b = rand(shape), rand(c, seed=1), rand(c, seed=2)
    rm, rv = rand(c, seed=3), np.abs(rand(c, seed=4)) + 0.5
    y, _, _ = rc.batch_norm.batch_norm_forward(order.put(x), order.put(w), order.put(b), order.put(rm),
                                    order.put(rv), False, 0.1, 1e-5)
    ref = F.batch_norm(torch.tensor(x), torch.tensor(rm), torch.tensor(rv), torch.tensor(w),
                       torch.tensor(b), False, 0.1, 1e-5)
    np.testing.assert_allclose(order.get(y), ref.numpy(), **tol(np.float64))
    # no weight/bias, no running stats: batch statistics only
    tx = t64(x)
    ty = F.batch_norm(tx, None, None, None, None, True, 0.1, 1e-5)
    gy = rand(shape, seed=5)
    ty.backward(torch.tensor(gy))
    y, mean, invstd = rc.batch_norm.batch_norm_forward(order.put(x), None, None, None, None, True, 0.1,
                                            1e-5)
    gx, _, _ = rc.batch_norm.batch_norm_backward(order.put(gy), order.put(x), None, mean, invstd)
    np.testing.assert_allclose(order.get(y), ty.detach().numpy(), **tol(np.float64))
    np.testing.assert_allclose(order.get(gx), tx.grad.numpy(), **tol(np.float64))


def test_batch_norm_is_bitwise_reproducible():
    x, gy, w = rand((3, 4, 9, 7)), rand((3, 4, 9, 7), seed=1), rand(4, seed=2)
    runs = []
    for seed in (1, 2):
        with cuda_launch.emulator(order="random", seed=seed, shuffle_blocks=True):
            y, m, s = rc.batch_norm.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5)
            gx, gw, gb = rc.batch_norm.batch_norm_backward(gy, x, w, m, s)
            runs.append(np.concatenate([a.ravel() for a in (y, m, s, gx, gw, gb)]))
    assert runs[0].tobytes() == runs[1].tobytes()


# ================================ fused optimizers ============================================
OPT_SHAPES = [(3, 5), (rc.optim.OPTIM_CHUNK + 1,), (1,), (2, 3, 3, 3), (rc.optim.OPTIM_CHUNK,)]
OPT_CASES = {
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd-momentum-wd": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov-max": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    "sgd-dampening": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    "adam": ("Adam", dict(lr=0.01)),
    "adam-l2-amsgrad": ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "adamw-max": ("AdamW", dict(lr=0.01, betas=(0.3, 0.9), maximize=True)),
}


def _optimize(dev, case, dtype, use_kernels=True, steps=3):
    import gpudiff
    from gpudiff import optim
    name, kw = OPT_CASES[case]
    rng = np.random.default_rng(1)
    ps = [gpudiff.tensor(rng.standard_normal(s).astype(dtype), device=dev, requires_grad=True)
          for s in OPT_SHAPES]
    opt = getattr(optim, name)(ps, **kw)
    with kernels.use_kernels(use_kernels):
        for _ in range(steps):
            for p in ps:
                p.grad = gpudiff.tensor(rng.standard_normal(p.shape).astype(dtype), device=dev)
            opt.step()
    return [p.detach().cpu().numpy() for p in ps]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(OPT_CASES))
def test_fused_optimizer_matches_the_cpu_optimizer(case, dtype, monkeypatch):
    names = []
    launch = rc.launch.launch
    for module in rc.WRAPPERS:
        monkeypatch.setattr(module, "launch", lambda f, n, *a, **k: (names.append(n), launch(f, n, *a, **k)))
    cuda = _optimize("cuda", case, dtype)
    # the bitwise reference is the CPU optimizer's NumPy path (the CPU's own C++ kernel is
    # built with other floating-point contractions: compared below within rounding)
    cpu = _optimize("cpu", case, dtype, use_kernels=False)
    cpu_kernel = _optimize("cpu", case, dtype)
    # one launch per step for all five tensors (SGD's first momentum step goes the reference
    # way: the buffer starts as a copy of the gradient)
    kind = "sgd_step_multi" if OPT_CASES[case][0] == "SGD" else "adam_step_multi"
    first_ref = "momentum" in OPT_CASES[case][1]
    assert names == [f"{kind}<{'float' if dtype == np.float32 else 'double'}>"] * (3 - first_ref)
    for a, b in zip(cuda, cpu):
        # same operations in the same order: bit-identical in the emulator (a GPU may fuse
        # multiply-adds, an ulp apart)
        assert a.tobytes() == b.tobytes()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for a, c in zip(cuda, cpu_kernel):
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol)


def test_fused_optimizer_declines_non_contiguous_state():
    p = np.zeros((4, 4), np.float32)
    g = np.ones((4, 4), np.float32)
    assert rc.optim.sgd_step([p[:, ::2]], [g[:, ::2]], [None], 0.1, 0, 0, 0, False, False) \
        is NotImplemented
    assert rc.optim.sgd_step([p], [g[::1, ::1].T], [None], 0.1, 0, 0, 0, False, False) is None
    np.testing.assert_array_equal(p, -0.1 * np.ones((4, 4), np.float32))  # grad copy used
    assert rc.optim.adam_step([p], [g], [np.zeros_like(p)], [np.zeros_like(p)], None, [1.0], 0.1,
                        0.9, 0.99, 1e-8, 0, True, False, False) is NotImplemented


# ================================ memory-traffic tracer =======================================
def test_tracer_counts_sectors_like_a_gpu():
    from gpudiff.runtime.cuda import trace as cuda_trace
    x = rand((64, 100), np.float32)
    y = np.empty_like(x)
    # float4 loads of consecutive lanes: 16 sectors per request, nothing wasted
    r = cuda_trace.traced_launch("activations.cu", "relu_fwd<float>", 4, 256,
                                 (x, y, np.int64(x.size)))
    assert r["sector_efficiency"] == 1.0 and r["sectors_per_request"] == 16.0
    assert r["unique_bytes"] == {0: x.nbytes, 1: y.nbytes}
    # a column walk of a (N, C) matrix by consecutive lanes (channel-per-block batch norm on a
    # 2-D input would do this): each float in its own sector, 1/8 efficient
    xt = rand((256, 8), np.float32)
    r = cuda_trace.traced_launch(
        "batch_norm.cu", "batch_norm_fwd_train_plane<float>", 1, 32,
        (xt.reshape(256, 8, 1), np.zeros(1, np.float32), np.zeros(1, np.float32),
         np.zeros(1, np.float32), np.zeros(1, np.float32), np.empty((256, 8, 1), np.float32),
         np.empty(8, np.float32), np.empty(8, np.float32), np.int32(256), np.int32(8),
         np.int64(1), np.float32(0.1), np.float32(1e-5), np.int32(0), np.int32(0),
         np.int32(0), np.int32(0)))
    assert r["sectors_per_request"] > 20 and r["sector_efficiency"] < 0.2
    # ... which is why the (N, C) layout has its own kernel: a warp reads 32 channels of a row
    r = cuda_trace.traced_launch(
        "batch_norm.cu", "batch_norm_fwd_train_cols<float>", 1, (32, 8),
        (rand((256, 32), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32),
         np.zeros(1, np.float32), np.zeros(1, np.float32), np.empty((256, 32), np.float32),
         np.empty(32, np.float32), np.empty(32, np.float32), np.int32(256), np.int32(32),
         np.float32(0.1), np.float32(1e-5), np.int32(0), np.int32(0), np.int32(0)))
    assert r["sector_efficiency"] > 0.95


# ================================ ops on the emulated device ===================================
def _op_grads(dev, fn, *arrays):
    import gpudiff
    ts = [gpudiff.tensor(a, device=dev, requires_grad=True) for a in arrays]
    y = fn(*ts)
    (y * y).sum().backward()
    return [y.detach().cpu().numpy()] + [t.grad.cpu().numpy() for t in ts]


@pytest.mark.parametrize("name", ["max", "max-dilated-ceil", "avg", "adaptive_max",
                                  "adaptive_avg", "batch_norm2d", "batch_norm1d"])
def test_pool_and_norm_ops_on_cuda_match_cpu(name, monkeypatch):
    import gpudiff.nn.functional as gF
    launched, modes = [], []
    launch = rc.launch.launch

    def spy(f, n, grid, block, args, *a, **k):
        launched.append(n)
        if n.startswith("max_pool2d_bwd"):
            modes.append(int(args[8]))  # 0: window gather, 1: adaptive, 2: geometry unknown
        return launch(f, n, grid, block, args, *a, **k)

    for module in rc.WRAPPERS:
        monkeypatch.setattr(module, "launch", spy)
    x = rand((2, 3, 9, 8), np.float32)
    fns = {
        "max": lambda t: gF.max_pool2d(t, 3, 2, 1),
        "max-dilated-ceil": lambda t: gF.max_pool2d(t, (2, 3), (2, 1), (1, 1), (2, 1), True),
        "avg": lambda t: gF.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False),
        "adaptive_max": lambda t: gF.adaptive_max_pool2d(t, (4, 3)),
        "adaptive_avg": lambda t: gF.adaptive_avg_pool2d(t, (4, 3)),
        "batch_norm2d": lambda t: gF.batch_norm(t, None, None, training=True),
        "batch_norm1d": lambda t: gF.batch_norm(t.reshape(6, -1), None, None, training=True),
    }
    cuda = _op_grads("cuda", fns[name], x)
    cpu = _op_grads("cpu", fns[name], x)
    for a, b in zip(cuda, cpu):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the CUDA kernels ran, and the max-pool backward gathered with the window known
    want = {"max": "max_pool2d_bwd<float>", "max-dilated-ceil": "max_pool2d_bwd<float>",
            "avg": "avg_pool2d_bwd<float>", "adaptive_max": "max_pool2d_bwd<float>",
            "adaptive_avg": "adaptive_avg_pool2d_bwd<float>",
            "batch_norm2d": "batch_norm_bwd_plane<float>",
            "batch_norm1d": "batch_norm_bwd_cols<float>"}[name]
    assert want in launched
    assert modes == ({"max": [0], "max-dilated-ceil": [0], "adaptive_max": [1]}).get(name, [])


def test_tracer_groups_requests_by_sync_epoch():
    # the implicit-GEMM forward re-loads its tiles after every barrier: grouped per epoch
    # (emulator.cpp resume() -> trace_resume) its gathers are ~98% efficient; a tracer that
    # lost the epochs would mix the steps of a whole block and report far less
    from gpudiff.runtime.cuda import trace as cuda_trace
    x, w = rand((2, 16, 32, 32), np.float32), rand((16, 16, 3, 3), np.float32, 1)
    g = geometry.ConvGeom(x.shape, w.shape, 1, 1, 1, 1)
    y = np.empty((2, 16, 32, 32), np.float32)
    r = cuda_trace.traced_launch("conv.cu", rc.conv._igemm_name("conv2d_fwd_igemm", "float", rc.conv.TILE_S),
                                 rc.conv._igemm_grid(2 * 32 * 32, 16, 1, rc.conv.TILE_S), 256,
                                 (x, w, np.zeros(1, np.float32), y) + rc.launch.i32(*g.kernel_args()) + (np.int32(0),))
    assert r["sector_efficiency"] > 0.95
    assert r["unique_bytes"] == {0: x.nbytes, 1: w.nbytes, 3: y.nbytes}  # bias not read


# ================================ the GPU suite, emulated ======================================
@pytest.mark.slow
def test_gpu_suite_runs_on_the_emulated_device(tmp_path):
    # bench/gpu_suite.py is the one command for a real GPU; here it runs with tiny shapes on
    # the emulator, so the script is known to work before a GPU ever sees it
    import importlib.util
    import json
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("gpu_suite",
                                                  os.path.join(root, "bench", "gpu_suite.py"))
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    res, text = suite.run(str(tmp_path), tiny=True)
    assert res["emulated"] and "EMULATED" in text and "emulated" in res["device"]
    assert res["all_ok"], text
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert {r["ran"] for r in saved["conv"]} >= {"implicit_gemm", "direct"}
    assert {r["op"] for r in saved["memory"]} >= {"max_pool2d bwd 2x2", "batch_norm bwd (train)",
                                                  "sgd step (fused, 29 tensors)",
                                                  "cross_entropy fwd+bwd (10 classes)"}
    assert [r["model"] for r in saved["train"]] == ["lenet", "resnet-small"]
    # captured steps timed too (a CUDAGraph on the emulated device; PyTorch eager on the CPU)
    assert all(r["gpudiff_graph_ms"] > 0 and r["torch_graph_ms"] > 0 for r in saved["train"])
    assert "torch graph" in text
    assert saved["settings"]["tf32"].startswith("off")
    # the tensor-core section: each precision's three passes ran on the tensor cores
    assert {(r["precision"], r["ran"]) for r in saved["tensor_core"]} == {
        ("tf32", "tf32"), ("float16", "f16"), ("bfloat16", "bf16")}
    assert len(saved["tensor_core"]) == 9 and all(r["ok"] for r in saved["tensor_core"])
    assert [r["precision"] for r in saved["train_precision"]] == ["fp32", "tf32", "float16",
                                                                  "bfloat16"]
    assert all(r["gpudiff_cuda_ms"] > 0 for r in saved["train_precision"])
    assert (tmp_path / "gpu_suite.txt").read_text().startswith("gpudiff GPU suite")


@pytest.mark.slow
def test_memory_report_lenet_meets_the_row_and_pooling_targets(tmp_path):
    # bench/cuda_memory_report.py (a subprocess: it patches the launchers) on LeNet's step:
    # the 10-class cross-entropy (short-row kernel) and the 2x2 average pools keep their
    # sector-efficiency targets, every memory-bound kernel its traffic ratio
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, os.path.join(root, "bench", "cuda_memory_report.py"),
                    "--models", "lenet", "--no-variants", "--out", str(out),
                    "--resources", str(tmp_path / "none.json")],
                   check=True, capture_output=True, env=dict(os.environ, GPUDIFF_CUDA="emulate"))
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["kernels"]}
    assert rows["cross_entropy_fwd_bwd_small<float>"]["sector_efficiency"] >= 0.9
    assert rows["cross_entropy_fwd_bwd_small<float>"]["traffic_ratio"] <= 1.05
    assert rows["avg_pool2d_fwd_pairs<float>"]["sector_efficiency"] >= 0.8
    assert rows["sgd_step_multi<float>"]["sector_efficiency"] >= 0.9
    for r in rows.values():
        if "traffic_target" in r:
            assert r["meets_traffic_target"], r


# ================================ public settings ============================================
def test_backends_cuda_conv_algorithm_setting_forces_the_path():
    # gpudiff.backends.cuda.conv_algorithm (torch.backends.cudnn's place) sets what conv2d
    # runs on the cuda device, and last_conv_algorithm says what ran
    import gpudiff
    import gpudiff.nn.functional as gF

    settings = gpudiff.backends.cuda
    x = gpudiff.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    w = gpudiff.randn(4, 3, 3, 3, device="cuda", requires_grad=True)
    ref = F.conv2d(torch.from_numpy(x.detach().cpu().numpy()),
                   torch.from_numpy(w.detach().cpu().numpy()),
                   padding=1).numpy()
    assert settings.conv_algorithm == "auto"
    try:
        for algo in ("im2col", "direct", "implicit_gemm"):
            settings.conv_algorithm = algo
            assert rc.conv.conv_algorithm == algo
            y = gF.conv2d(x, w, padding=1)
            y.sum().backward()
            assert settings.last_conv_algorithm == {"forward": algo, "backward_input": algo,
                                                    "backward_weight": algo}
            np.testing.assert_allclose(y.detach().cpu().numpy(), ref, rtol=1e-4, atol=1e-4)
        with settings.use_conv_algorithm("direct"):
            gF.conv2d(x, w, padding=1)
            assert settings.last_conv_algorithm["forward"] == "direct"
        assert settings.conv_algorithm == "implicit_gemm"
        with pytest.raises(ValueError, match="conv_algorithm must be one of"):
            settings.conv_algorithm = "cudnn"
        assert settings.conv_algorithm == "implicit_gemm"
    finally:
        settings.conv_algorithm = "auto"


def _conv_step(gpudiff, gF, x, w):
    x.grad = w.grad = None
    y = gF.conv2d(x, w, padding=1)
    y.sum().backward()
    return y.detach().cpu().numpy(), x.grad.cpu().numpy(), w.grad.cpu().numpy()


def test_backends_cudnn_benchmark_and_enabled():
    # torch.backends.cudnn's switches act on our kernels: benchmark uses the heuristic on the
    # emulated device (its times say nothing about a GPU's) and times nothing; enabled=False
    # sends the convolution ops to their reference (im2col + GEMM), same numbers
    import gpudiff
    import gpudiff.nn.functional as gF

    cudnn = gpudiff.backends.cudnn
    x = gpudiff.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    w = gpudiff.randn(4, 3, 3, 3, device="cuda", requires_grad=True)
    plain = _conv_step(gpudiff, gF, x, w)
    heuristic = dict(gpudiff.backends.cuda.last_conv_algorithm)
    # (allow_tf32's default, True, is checked in test_tensor_core.py: this file turns it off)
    assert (cudnn.benchmark, cudnn.enabled, cudnn.allow_tf32) == (False, True, False)
    assert gpudiff.backends.cuda.matmul.allow_tf32 is False
    try:
        cudnn.benchmark = True
        assert rc.conv.benchmark is True
        for a, b in zip(_conv_step(gpudiff, gF, x, w), plain):
            np.testing.assert_array_equal(a, b)
        assert gpudiff.backends.cuda.last_conv_algorithm == heuristic
        assert rc.conv.benchmark_cache == {}            # nothing timed on the emulator
        cudnn.benchmark = False
        cudnn.enabled = False
        rc.conv.reset_conv_log()
        for a, b in zip(_conv_step(gpudiff, gF, x, w), plain):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert gpudiff.backends.cuda.last_conv_algorithm == {}  # our conv kernels did not run
    finally:
        cudnn.benchmark, cudnn.enabled = False, True


def test_backends_mps_answers_no():
    # PyTorch's MNIST example asks before choosing a device
    import gpudiff
    assert gpudiff.backends.mps.is_available() is False
    assert gpudiff.backends.mps.is_built() is False
    assert gpudiff.backends.cudnn.is_available() is gpudiff.cuda.is_available()


@pytest.mark.gpu
def test_backends_cudnn_benchmark_times_each_geometry_once_on_a_gpu():
    import gpudiff
    import gpudiff.nn.functional as gF
    if not gpu_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    x = gpudiff.randn(8, 16, 16, 16, device="cuda", requires_grad=True)
    w = gpudiff.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    ref = _conv_step(gpudiff, gF, x, w)
    try:
        gpudiff.backends.cudnn.benchmark = True
        rc.conv.benchmark_cache.clear()
        out = _conv_step(gpudiff, gF, x, w)
        assert len(rc.conv.benchmark_cache) == 3          # one choice per pass
        for a, b in zip(out, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    finally:
        gpudiff.backends.cudnn.benchmark = False
