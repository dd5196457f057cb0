"""Layers, activations and losses as modules, against PyTorch with the same weights."""
import math

import numpy as np
import pytest
import torch

import gpudiff
import gpudiff.nn.functional as F
from gpudiff import nn


def has_F(*names):
    """Skip marker for layers whose ops (gpudiff/ops/conv.py, pool.py, norm.py) are not
    there yet."""
    missing = [n for n in names if not hasattr(F, n)]
    return pytest.mark.skipif(bool(missing), reason=f"F.{', F.'.join(missing)} not available")


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def copy_weights(ours, ref):
    """Load ``ref``'s (torch) state into ``ours`` and check every key matched."""
    res = ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    assert res.missing_keys == [] and res.unexpected_keys == []


def compare(ours, ref, *inputs, rtol=1e-5, atol=1e-5, grad=True):
    """Same output and same input/parameter gradients (of a fixed random projection)."""
    xs_t = [torch.tensor(x, requires_grad=grad and x.dtype.kind == "f") for x in inputs]
    xs_g = [gpudiff.tensor(x, requires_grad=grad and x.dtype.kind == "f") for x in inputs]
    yt, yg = ref(*xs_t), ours(*xs_g)
    np.testing.assert_allclose(yg.detach().numpy(), yt.detach().numpy(), rtol=rtol, atol=atol)
    if not grad:
        return
    proj = rand(*yt.shape, seed=9)
    (yt * torch.tensor(proj)).sum().backward()
    (yg * gpudiff.tensor(proj)).sum().backward()
    for a, b in zip(xs_t, xs_g):
        if a.requires_grad:
            np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=rtol, atol=atol)
    for (name, pt), (_, pg) in zip(ref.named_parameters(), ours.named_parameters()):
        if pt.grad is not None:
            np.testing.assert_allclose(pg.grad.numpy(), pt.grad.numpy(), rtol=rtol, atol=atol,
                                       err_msg=name)


# ---- default initialisation -----------------------------------------------------------
@pytest.mark.parametrize("make, fan_in", [
    (lambda nn: nn.Linear(50, 40), 50),
    (lambda nn: nn.Conv2d(6, 40, 3), 54),
    (lambda nn: nn.Conv2d(6, 42, (3, 2), groups=3), 12),
    (lambda nn: nn.ConvTranspose2d(40, 12, 3, groups=2), 54),
])
def test_default_init_is_kaiming_uniform_a_sqrt5(make, fan_in):
    m, ref = make(nn), make(torch.nn)
    assert m.weight.shape == tuple(ref.weight.shape)
    assert m.bias.shape == tuple(ref.bias.shape)
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), ..)
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(b).max() <= bound
    # the spread of a uniform on [-bound, bound]: std = bound / sqrt(3)
    assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert abs(w.mean()) < 0.1 * bound


def test_default_init_is_reproducible_with_manual_seed():
    gpudiff.manual_seed(3)
    a = nn.Linear(4, 4).weight.detach().numpy()
    gpudiff.manual_seed(3)
    b = nn.Linear(4, 4).weight.detach().numpy()
    c = nn.Linear(4, 4).weight.detach().numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_norm_and_embedding_init():
    bn = nn.BatchNorm2d(5)
    assert bn.weight.tolist() == [1.0] * 5 and bn.bias.tolist() == [0.0] * 5
    assert bn.running_mean.tolist() == [0.0] * 5 and bn.running_var.tolist() == [1.0] * 5
    assert int(bn.num_batches_tracked) == 0 and bn.num_batches_tracked.dtype == np.int64
    assert nn.BatchNorm1d(3, affine=False).weight is None
    assert nn.BatchNorm1d(3, track_running_stats=False).running_mean is None
    assert list(nn.BatchNorm1d(3, track_running_stats=False).state_dict()) == ["weight", "bias"]
    ln = nn.LayerNorm([2, 3])
    assert ln.weight.shape == (2, 3) and float(ln.weight.sum()) == 6.0
    emb = nn.Embedding(1000, 8, padding_idx=3)
    w = emb.weight.detach().numpy()
    assert np.all(w[3] == 0)
    assert abs(w.std() - 1.0) < 0.05  # N(0, 1)


# ---- layers with the same weights as torch ---------------------------------------------
def test_linear_and_bilinear():
    ref, ours = torch.nn.Linear(5, 3), nn.Linear(5, 3)
    copy_weights(ours, ref)
    compare(ours, ref, rand(4, 2, 5))
    ref, ours = torch.nn.Bilinear(3, 4, 2), nn.Bilinear(3, 4, 2)
    copy_weights(ours, ref)
    compare(ours, ref, rand(5, 3), rand(5, 4, seed=1))


def test_layer_norm():
    ref, ours = torch.nn.LayerNorm((4, 5)), nn.LayerNorm((4, 5))
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    copy_weights(ours, ref)
    compare(ours, ref, rand(3, 4, 5), rtol=1e-4, atol=1e-5)
    ref, ours = torch.nn.LayerNorm(5, elementwise_affine=False), \
        nn.LayerNorm(5, elementwise_affine=False)
    compare(ours, ref, rand(3, 5), rtol=1e-4, atol=1e-5)


def test_embedding_forward_backward_and_padding_idx():
    ref = torch.nn.Embedding(10, 4, padding_idx=2)
    ours = nn.Embedding(10, 4, padding_idx=2)
    copy_weights(ours, ref)
    idx = np.array([[1, 2, 2, 9], [2, 1, 1, 0]])
    compare(ours, ref, idx)
    assert np.all(ours.weight.grad.numpy()[2] == 0)  # the padding row gets no gradient
    # repeated ids accumulate; scale_grad_by_freq divides by the count
    ref = torch.nn.Embedding(6, 3, scale_grad_by_freq=True)
    ours = nn.Embedding(6, 3, scale_grad_by_freq=True)
    copy_weights(ours, ref)
    compare(ours, ref, np.array([0, 0, 0, 4, 5, 4]))
    with pytest.raises(RuntimeError, match="Long, Int"):
        ours(gpudiff.tensor([0.0, 1.0]))
    with pytest.raises(IndexError, match="out of range"):
        ours(gpudiff.tensor([6]))


def test_embedding_max_norm_and_from_pretrained():
    w = rand(5, 3) * 3
    ref = torch.nn.Embedding.from_pretrained(torch.tensor(w), max_norm=1.0)
    ours = nn.Embedding.from_pretrained(gpudiff.tensor(w), max_norm=1.0)
    assert not ours.weight.requires_grad
    idx = np.array([0, 3, 3])
    np.testing.assert_allclose(ours(gpudiff.tensor(idx)).numpy(),
                               ref(torch.tensor(idx)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.weight.numpy(), ref.weight.numpy(), rtol=1e-5)  # renormed


@pytest.mark.parametrize("name, args", [
    ("ReLU", ()), ("LeakyReLU", (0.2,)), ("ELU", (0.7,)), ("GELU", ()), ("GELU", ("tanh",)),
    ("SiLU", ()), ("Sigmoid", ()), ("Tanh", ()), ("Softmax", (1,)), ("LogSoftmax", (-1,)),
    ("Softplus", (2.0, 3.0)), ("Hardtanh", (-0.5, 0.7)), ("ReLU6", ()), ("Softmin", (1,)),
    ("LogSigmoid", ()),
])
def test_activation_modules(name, args):
    x = rand(4, 5) * 4
    compare(getattr(nn, name)(*args), getattr(torch.nn, name)(*args), x, rtol=1e-5,
            atol=1e-6)


def test_inplace_activation_module():
    x = gpudiff.tensor([-1.0, 2.0, 7.0])
    y = nn.ReLU6(inplace=True)(x)
    assert y is x and x.tolist() == [0.0, 2.0, 6.0]


@pytest.mark.parametrize("name, kwargs, target", [
    ("CrossEntropyLoss", {}, "class"),
    ("CrossEntropyLoss", {"label_smoothing": 0.1, "ignore_index": 1}, "class"),
    ("CrossEntropyLoss", {"weight": [1.0, 2.0, 0.5, 1.0], "reduction": "sum"}, "class"),
    ("CrossEntropyLoss", {}, "prob"),
    ("NLLLoss", {"reduction": "none"}, "class"),
    ("NLLLoss", {"weight": [1.0, 2.0, 0.5, 1.0]}, "class"),
    ("MSELoss", {}, "same"), ("L1Loss", {"reduction": "sum"}, "same"),
    ("SmoothL1Loss", {"beta": 0.5}, "same"), ("HuberLoss", {"delta": 0.3}, "same"),
    ("BCELoss", {}, "unit"), ("BCEWithLogitsLoss", {"pos_weight": [1.0, 2.0, 3.0, 0.5]},
                              "unit"),
    ("MultiMarginLoss", {"p": 2, "margin": 0.5}, "class"), ("KLDivLoss", {"reduction":
                                                                          "batchmean"}, "prob"),
])
def test_loss_modules(name, kwargs, target):
    x = rand(6, 4)
    if target == "class":
        y = np.array([0, 3, 1, 2, 1, 3])
    elif target == "prob":
        y = np.abs(rand(6, 4, seed=2))
        y = y / y.sum(1, keepdims=True)
    elif target == "unit":
        y = (rand(6, 4, seed=2) > 0).astype(np.float32)
    else:
        y = rand(6, 4, seed=2)
    if name == "BCELoss":
        x = 1 / (1 + np.exp(-x))
    if name == "KLDivLoss":
        x = np.log(np.abs(x) / np.abs(x).sum(1, keepdims=True))
    kt = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    kg = {k: gpudiff.tensor(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    ref, ours = getattr(torch.nn, name)(**kt), getattr(nn, name)(**kg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # weights are buffers
    xt, xg = torch.tensor(x, requires_grad=True), gpudiff.tensor(x, requires_grad=True)
    lt, lg = ref(xt, torch.tensor(y)), ours(xg, gpudiff.tensor(y))
    np.testing.assert_allclose(lg.detach().numpy(), lt.detach().numpy(), rtol=1e-5, atol=1e-6)
    lt.sum().backward()
    lg.sum().backward()
    np.testing.assert_allclose(xg.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_loss_legacy_reduction_arguments():
    with pytest.warns(UserWarning, match="reduction='sum'"):
        m = nn.MSELoss(size_average=False)
    assert m.reduction == "sum"
    with pytest.warns(UserWarning):
        assert nn.L1Loss(reduce=False).reduction == "none"
    with pytest.raises(ValueError, match="only p == 1 and p == 2"):
        nn.MultiMarginLoss(p=3)


def test_layer_argument_errors_like_torch():
    for make in (lambda nn: nn.Conv2d(3, 4, 3, groups=2),
                 lambda nn: nn.Conv2d(4, 3, 3, groups=2),
                 lambda nn: nn.Conv2d(2, 2, 3, padding="full"),
                 lambda nn: nn.Conv2d(2, 2, 3, stride=2, padding="same"),
                 lambda nn: nn.Conv2d(2, 2, 3, padding_mode="mirror"),
                 lambda nn: nn.ConvTranspose2d(2, 2, 3, padding_mode="reflect"),
                 lambda nn: nn.Dropout(1.5)):
        with pytest.raises(ValueError) as ref:
            make(torch.nn)
        with pytest.raises(ValueError) as ours:
            make(nn)
        # messages equal up to the listing of a Python set (its order varies by process)
        assert str(ours.value).split("{")[0] == str(ref.value).split("{")[0]
    with pytest.raises(AssertionError):
        torch.nn.Hardtanh(1.0, 0.5)
    with pytest.raises(AssertionError, match="must be greater than min_val"):
        nn.Hardtanh(1.0, 0.5)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        nn.BatchNorm2d(3)(gpudiff.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        nn.BatchNorm1d(3)(gpudiff.zeros(2, 3, 1, 1))


# ---- layers on the CNN ops --------------------------------------------------------------
@has_F("conv2d")
@pytest.mark.parametrize("kwargs", [
    {}, {"stride": 2, "padding": 1}, {"padding": "same", "dilation": 2},
    {"groups": 2, "bias": False}, {"padding": 1, "padding_mode": "reflect"},
    {"padding": (1, 2), "padding_mode": "circular"}, {"padding": "valid"},
])
def test_conv2d(kwargs):
    ref, ours = torch.nn.Conv2d(4, 6, 3, **kwargs), nn.Conv2d(4, 6, 3, **kwargs)
    copy_weights(ours, ref)
    compare(ours, ref, rand(2, 4, 9, 8), rtol=1e-4, atol=1e-5)


@has_F("conv_transpose2d")
@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1, "output_padding": 1},
                                    {"groups": 2, "dilation": 2}])
def test_conv_transpose2d(kwargs):
    ref, ours = torch.nn.ConvTranspose2d(4, 6, 3, **kwargs), nn.ConvTranspose2d(4, 6, 3, **kwargs)
    copy_weights(ours, ref)
    compare(ours, ref, rand(2, 4, 5, 6), rtol=1e-4, atol=1e-5)


@has_F("conv_transpose2d")
def test_conv_transpose2d_output_size():
    ref, ours = torch.nn.ConvTranspose2d(2, 3, 3, stride=2), nn.ConvTranspose2d(2, 3, 3, stride=2)
    copy_weights(ours, ref)
    x = rand(1, 2, 4, 4)
    yt = ref(torch.tensor(x), output_size=[10, 10])
    yg = ours(gpudiff.tensor(x), output_size=[1, 3, 10, 10])
    assert yg.shape == tuple(yt.shape) == (1, 3, 10, 10)
    np.testing.assert_allclose(yg.detach().numpy(), yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="valid sizes"):
        ours(gpudiff.tensor(x), output_size=[12, 12])


@has_F("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d")
@pytest.mark.parametrize("name, args, kwargs", [
    ("MaxPool2d", (2,), {}), ("MaxPool2d", (3,), {"stride": 2, "padding": 1,
                                                  "ceil_mode": True}),
    ("AvgPool2d", (2,), {}), ("AvgPool2d", (3, 1, 1), {"count_include_pad": False}),
    ("AdaptiveAvgPool2d", ((2, 3),), {}), ("AdaptiveMaxPool2d", (3,), {}),
])
def test_pooling(name, args, kwargs):
    compare(getattr(nn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs),
            rand(2, 3, 7, 8), rtol=1e-5, atol=1e-6)


@has_F("max_pool2d")
def test_max_pool_return_indices():
    x = rand(1, 2, 4, 4)
    yt, it = torch.nn.MaxPool2d(2, return_indices=True)(torch.tensor(x))
    yg, ig = nn.MaxPool2d(2, return_indices=True)(gpudiff.tensor(x))
    np.testing.assert_array_equal(yg.numpy(), yt.numpy())
    np.testing.assert_array_equal(ig.numpy(), it.numpy())


@has_F("batch_norm")
@pytest.mark.parametrize("cls, shape, kwargs", [
    ("BatchNorm2d", (4, 3, 5, 5), {}), ("BatchNorm1d", (8, 3), {"momentum": None}),
    ("BatchNorm1d", (4, 3, 6), {"affine": False}),
    ("BatchNorm2d", (4, 3, 2, 2), {"track_running_stats": False}),
])
def test_batch_norm_train_then_eval(cls, shape, kwargs):
    ref, ours = getattr(torch.nn, cls)(3, **kwargs), getattr(nn, cls)(3, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    copy_weights(ours, ref)
    for step in range(3):
        compare(ours, ref, rand(*shape, seed=step) * 2 + 1, rtol=1e-4, atol=1e-4)
    for (k, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    ref.eval()
    ours.eval()
    compare(ours, ref, rand(*shape, seed=7), rtol=1e-4, atol=1e-4)
    if ref.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == 3


@has_F("dropout", "dropout2d")
def test_dropout_modules_train_and_eval():
    x = gpudiff.ones(200, 50)
    d = nn.Dropout(0.3)
    y = d(x).numpy()
    kept = y != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    d.eval()
    assert d(x) is x or np.array_equal(d(x).numpy(), x.numpy())
    d2 = nn.Dropout2d(0.5)
    y = d2(gpudiff.ones(20, 30, 4, 4)).numpy()
    per_channel = y.reshape(20, 30, -1)
    assert np.all((per_channel == 0).all(-1) | (per_channel == 2.0).all(-1))
