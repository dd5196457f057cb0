"""CNN ops beyond the op database (tests/opdb/cnn.py): output-size rules swept against
PyTorch, argument errors, batch-norm running statistics, dropout statistics and
reproducibility, kernel vs reference at training sizes, and a small CNN trained side by side
with PyTorch."""
import itertools

import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional as F
from gpudiff import runtime

torch = pytest.importorskip("torch")
TF = torch.nn.functional


def g(a, requires_grad=False):
    return gpudiff.tensor(np.asarray(a), requires_grad=requires_grad)


def t(a, requires_grad=False):
    return torch.tensor(np.asarray(a), requires_grad=requires_grad)


# ---- output sizes, exactly as PyTorch's -----------------------------------------------------
def _same_outcome(gd_fn, torch_fn, x, *args):
    """gd_fn(x, *args) and torch_fn(x, *args) (weights among args as arrays) both raise, or
    give the same shape."""
    def call(fn, conv):
        return fn(conv(x), *[conv(a) if isinstance(a, np.ndarray) else a for a in args])
    try:
        want = tuple(call(torch_fn, t).shape)
    except (RuntimeError, ValueError):
        with pytest.raises((RuntimeError, ValueError)):
            call(gd_fn, g)
        return
    assert tuple(call(gd_fn, g).shape) == want, args


@pytest.mark.parametrize("H", [1, 2, 5, 7, 8])
def test_pool_output_sizes_match_torch(H):
    x = np.zeros((1, 1, H, H + 1), np.float32)
    for k, s, p, d, ceil in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2), (False, True)):
        _same_outcome(F.max_pool2d, TF.max_pool2d, x, k, s, p, d, ceil)
        if d == 1:
            _same_outcome(F.avg_pool2d, TF.avg_pool2d, x, k, s, p, ceil)


@pytest.mark.parametrize("H", [1, 3, 6, 9])
def test_conv_output_sizes_match_torch(H):
    x = np.zeros((1, 2, H, H + 2), np.float32)
    for k, s, p, d in itertools.product((1, 2, 3), (1, 2), (0, 1, 2), (1, 2)):
        w = np.zeros((3, 2, k, k), np.float32)
        _same_outcome(F.conv2d, TF.conv2d, x, w, None, s, p, d)


def test_conv_transpose_output_sizes_match_torch():
    x = np.zeros((1, 2, 4, 5), np.float32)
    for k, s, p, op, d in itertools.product((1, 3), (1, 2, 3), (0, 1), (0, 1, 2), (1, 2)):
        w = np.zeros((2, 3, k, k), np.float32)
        _same_outcome(F.conv_transpose2d, TF.conv_transpose2d, x, w, None, s, p, op, 1, d)


# ---- argument errors -----------------------------------------------------------------------
def test_conv_argument_errors():
    x = g(np.zeros((1, 4, 5, 5), np.float32))
    with pytest.raises(RuntimeError, match="channels"):
        F.conv2d(x, g(np.zeros((2, 3, 3, 3), np.float32)))
    with pytest.raises(RuntimeError, match="divisible"):
        F.conv2d(x, g(np.zeros((3, 2, 3, 3), np.float32)), groups=2)
    with pytest.raises(ValueError, match="strided"):
        F.conv2d(x, g(np.zeros((2, 4, 3, 3), np.float32)), stride=2, padding="same")
    with pytest.raises(ValueError, match="padding string"):
        F.conv2d(x, g(np.zeros((2, 4, 3, 3), np.float32)), padding="full")
    with pytest.raises(RuntimeError, match="too small"):
        F.conv2d(x, g(np.zeros((2, 4, 7, 7), np.float32)))
    with pytest.raises(RuntimeError, match="type"):
        F.conv2d(x, g(np.zeros((2, 4, 3, 3), np.float64)))
    with pytest.raises(RuntimeError, match="output padding"):
        F.conv_transpose2d(x, g(np.zeros((4, 2, 3, 3), np.float32)), stride=2,
                           output_padding=2)


def test_pool_argument_errors():
    x = g(np.zeros((1, 1, 6, 6), np.float32))
    with pytest.raises(RuntimeError, match="half"):
        F.max_pool2d(x, 2, padding=2)
    with pytest.raises(RuntimeError, match="half"):
        F.avg_pool2d(x, 3, padding=2)
    with pytest.raises(RuntimeError, match="not zero"):
        F.avg_pool2d(x, 2, divisor_override=0)
    with pytest.raises(RuntimeError, match="3-D"):
        F.max_pool2d(g(np.zeros((6, 6), np.float32)), 2)


def test_interpolate_argument_errors():
    x = g(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="only one"):
        F.interpolate(x, size=2, scale_factor=2)
    with pytest.raises(ValueError, match="either"):
        F.interpolate(x)
    with pytest.raises(NotImplementedError, match="bilinear"):
        F.interpolate(x, size=2, mode="bilinear")
    with pytest.raises(ValueError, match="spatial"):
        F.interpolate(x, size=(2, 2, 2))


# ---- batch norm running statistics ---------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3, 3), (4, 4, 7)])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_batch_norm_running_stats_follow_torch(shape, use_kernels):
    rng = np.random.default_rng(3)
    C = shape[1]
    rm_g, rv_g = g(np.zeros(C)), g(np.ones(C))
    rm_t, rv_t = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    with runtime.use_kernels(use_kernels):
        for step in range(3):
            x = rng.standard_normal(shape) * 2 + step
            v0 = rm_g._version[0]
            F.batch_norm(g(x), rm_g, rv_g, training=True, momentum=0.3)
            TF.batch_norm(t(x), rm_t, rv_t, training=True, momentum=0.3)
            assert rm_g._version[0] > v0       # saved copies of the buffer would notice
            np.testing.assert_allclose(rm_g.numpy(), rm_t.numpy(), rtol=1e-12)
            np.testing.assert_allclose(rv_g.numpy(), rv_t.numpy(), rtol=1e-12)
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(F.batch_norm(g(x), rm_g, rv_g).numpy(),
                                   TF.batch_norm(t(x), rm_t, rv_t).numpy(), rtol=1e-10)


def test_batch_norm_errors():
    with pytest.raises(ValueError, match="more than 1 value"):
        F.batch_norm(g(np.zeros((1, 3))), None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean"):
        F.batch_norm(g(np.zeros((2, 3))), None, None, training=False)
    with pytest.raises(RuntimeError, match="shape"):
        F.batch_norm(g(np.zeros((2, 3))), None, None, g(np.ones(4)), training=True)


def test_batch_norm_module_train_eval():
    gbn, tbn = gpudiff.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3).double()
    gbn.double()
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.standard_normal((4, 3, 5, 5)) + 1
        np.testing.assert_allclose(gbn(g(x)).detach().numpy(), tbn(t(x)).detach().numpy(),
                                   rtol=1e-9, atol=1e-10)
    gbn.eval(), tbn.eval()
    x = rng.standard_normal((2, 3, 5, 5))
    np.testing.assert_allclose(gbn(g(x)).detach().numpy(), tbn(t(x)).detach().numpy(),
                               rtol=1e-9, atol=1e-10)


# ---- dropout -------------------------------------------------------------------------------
@pytest.mark.parametrize("use_kernels", [True, False])
def test_dropout_statistics_and_backward(use_kernels):
    x = g(np.ones((200, 500), np.float32), requires_grad=True)
    with runtime.use_kernels(use_kernels):
        y = F.dropout(x, 0.3)
        y.backward(gpudiff.ones(200, 500))
    yv = y.detach().numpy()
    kept = yv != 0
    assert abs(kept.mean() - 0.7) < 0.005             # 100k draws: 4 sigma is 0.006
    np.testing.assert_allclose(yv[kept], 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(x.grad.numpy() != 0, kept)  # the same mask backward
    np.testing.assert_allclose(x.grad.numpy()[kept], 1 / 0.7, rtol=1e-6)


def test_dropout_is_reproducible_and_fresh_per_call():
    x = g(np.ones((50, 50), np.float32))
    gpudiff.manual_seed(7)
    a, b = F.dropout(x, 0.5).numpy(), F.dropout(x, 0.5).numpy()
    gpudiff.manual_seed(7)
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), a)
    assert (a != b).any()


def test_dropout_edge_cases():
    x = g(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert F.dropout(x, 0.0) is x and F.dropout(x, 0.9, training=False) is x
    assert (F.dropout(x, 1.0).numpy() == 0).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, 1.5)
    y = g(np.ones((3, 4), np.float32))
    out = F.dropout(y, 0.5, inplace=True)
    assert out is y and set(np.unique(y.numpy())) <= {0.0, 2.0}


def test_dropout2d_drops_whole_channels():
    x = g(np.ones((40, 50, 3, 3), np.float32))
    y = F.dropout2d(x, 0.4).numpy()
    per_channel = y.reshape(40, 50, 9)
    assert (per_channel == per_channel[:, :, :1]).all()
    assert abs((per_channel[:, :, 0] != 0).mean() - 0.6) < 0.06


# ---- the fast kernels against the reference at training sizes ---------------------------------
def _run(fn, arrays):
    ts = [g(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(gpudiff.tensor(np.random.default_rng(1).standard_normal(out.shape)
                                .astype(out.dtype)))
    return [out.detach().numpy()] + [x.grad.numpy() for x in ts]


@pytest.mark.parametrize("case", ["mnist conv2", "resnet stage2", "strided grouped"])
def test_conv_kernel_vs_reference_at_training_size(case):
    rng = np.random.default_rng(0)
    xs, ws, kw = {"mnist conv2": ((16, 32, 26, 26), (64, 32, 3, 3), {}),
                  "resnet stage2": ((16, 32, 16, 16), (32, 32, 3, 3), {"padding": 1}),
                  "strided grouped": ((8, 16, 15, 15), (32, 8, 3, 3),
                                      {"stride": 2, "padding": 1, "groups": 2})}[case]
    arrays = [rng.standard_normal(xs).astype(np.float32),
              (rng.standard_normal(ws) * 0.1).astype(np.float32),
              rng.standard_normal(ws[0]).astype(np.float32)]

    def fn(x, w, b):
        return F.conv2d(x, w, b, **kw)
    fast = _run(fn, arrays)
    with runtime.use_kernels(False):
        ref = _run(fn, arrays)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * np.abs(b).max())


def test_pool_and_bn_kernels_vs_reference_at_training_size():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 24, 24)).astype(np.float32)
    for fn in (lambda a: F.max_pool2d(a, 2), lambda a: F.avg_pool2d(a, 3, 2, 1),
               lambda a: F.adaptive_avg_pool2d(a, 5), lambda a: F.adaptive_max_pool2d(a, 7),
               lambda a: F.batch_norm(a, None, None, training=True)):
        fast = _run(fn, [x])
        with runtime.use_kernels(False):
            ref = _run(fn, [x])
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ---- a small CNN trained side by side with PyTorch ----------------------------------------------
def test_small_cnn_trains_like_torch():
    def net(lib):
        nn = lib.nn
        lib.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    tnet, gnet = net(torch), net(gpudiff)
    gnet.load_state_dict({k: gpudiff.tensor(v.detach().numpy())
                          for k, v in tnet.state_dict().items()})
    topt = torch.optim.SGD(tnet.parameters(), lr=0.05, momentum=0.9)
    gopt = gpudiff.optim.SGD(gnet.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    for step in range(5):
        topt.zero_grad()
        lt = TF.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(y))
        lt.backward()
        topt.step()
        gopt.zero_grad()
        lg = F.cross_entropy(gnet(gpudiff.tensor(x)), gpudiff.tensor(y))
        lg.backward()
        gopt.step()
        assert lg.item() == pytest.approx(lt.item(), rel=1e-4, abs=1e-5), f"step {step}"
    assert lg.item() < 0.9 * F.cross_entropy(net(gpudiff)(gpudiff.tensor(x)),
                                             gpudiff.tensor(y)).item() or lg.item() < 2.0
