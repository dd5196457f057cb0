"""nn.init against PyTorch's formulas (distributions checked by their statistics)."""
import math

import numpy as np
import pytest
import torch

import gpudiff
from gpudiff import nn
from gpudiff.nn import init


@pytest.mark.parametrize("nonlinearity, param", [
    ("linear", None), ("conv2d", None), ("conv_transpose2d", None), ("sigmoid", None),
    ("tanh", None), ("relu", None), ("leaky_relu", None), ("leaky_relu", 0.2),
    ("leaky_relu", math.sqrt(5)), ("selu", None),
])
def test_calculate_gain(nonlinearity, param):
    assert init.calculate_gain(nonlinearity, param) == \
        torch.nn.init.calculate_gain(nonlinearity, param)


def test_calculate_gain_errors():
    with pytest.raises(ValueError, match="Unsupported nonlinearity foo"):
        init.calculate_gain("foo")
    with pytest.raises(ValueError, match="negative_slope"):
        init.calculate_gain("leaky_relu", "x")


def test_fan_in_fan_out_match_torch():
    for shape in [(3, 4), (8, 3, 5, 5), (2, 6, 3)]:
        assert init._calculate_fan_in_and_fan_out(gpudiff.empty(shape)) == \
            torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(gpudiff.empty(5))


def test_uniform_normal_constant_eye():
    t = gpudiff.empty(200, 300)
    assert init.uniform_(t, -2.0, 3.0) is t
    a = t.numpy()
    assert a.min() >= -2.0 and a.max() < 3.0 and abs(a.mean() - 0.5) < 0.02
    init.normal_(t, 1.0, 0.5)
    assert abs(t.numpy().mean() - 1.0) < 0.01 and abs(t.numpy().std() - 0.5) < 0.01
    init.constant_(t, 0.25)
    assert np.all(t.numpy() == 0.25)
    init.ones_(t)
    assert np.all(t.numpy() == 1)
    init.zeros_(t)
    assert np.all(t.numpy() == 0)
    e = init.eye_(gpudiff.empty(3, 5))
    np.testing.assert_array_equal(e.numpy(), np.eye(3, 5, dtype=np.float32))
    with pytest.raises(ValueError, match="Only tensors with 2 dimensions"):
        init.eye_(gpudiff.empty(2, 2, 2))


def test_initialisers_on_parameters_need_no_no_grad():
    p = nn.Parameter(gpudiff.empty(4, 4))
    init.kaiming_normal_(p)
    init.zeros_(p)
    assert p.requires_grad and p.grad_fn is None and float(p.abs().sum()) == 0.0


@pytest.mark.parametrize("fn, kwargs, shape, expected_std", [
    ("xavier_uniform_", {"gain": 2.0}, (300, 200), 2.0 * math.sqrt(2 / 500)),
    ("xavier_normal_", {}, (300, 200), math.sqrt(2 / 500)),
    ("kaiming_uniform_", {"a": 0, "nonlinearity": "relu"}, (300, 200), math.sqrt(2 / 200)),
    ("kaiming_normal_", {"mode": "fan_out", "nonlinearity": "relu"}, (300, 20, 3, 3),
     math.sqrt(2 / (300 * 9))),
    ("kaiming_uniform_", {"a": math.sqrt(5)}, (64, 32, 3, 3), 1 / math.sqrt(3 * 32 * 9)),
])
def test_variance_scaling_initialisers(fn, kwargs, shape, expected_std):
    t = getattr(init, fn)(gpudiff.empty(shape), **kwargs).numpy()
    r = getattr(torch.nn.init, fn)(torch.empty(shape), **kwargs).numpy()
    assert abs(t.std() - expected_std) < 0.03 * expected_std
    assert abs(t.std() - r.std()) < 0.04 * expected_std
    if "uniform" in fn:  # same support as torch: [-sqrt(3) std, sqrt(3) std]
        bound = math.sqrt(3) * expected_std
        assert np.abs(t).max() <= bound * (1 + 1e-6) and np.abs(t).max() > 0.99 * bound


def test_kaiming_mode_error_and_zero_element_warning():
    with pytest.raises(ValueError, match="Mode fan_avg not supported"):
        init.kaiming_uniform_(gpudiff.empty(2, 2), mode="fan_avg")
    with pytest.warns(UserWarning, match="zero-element"):
        init.kaiming_uniform_(gpudiff.empty(0, 3))


def test_orthogonal():
    for shape in [(6, 6), (4, 10), (10, 4), (3, 2, 2, 2)]:
        t = init.orthogonal_(gpudiff.empty(shape), gain=2.0).numpy().reshape(shape[0], -1)
        rows, cols = t.shape
        g = t @ t.T if rows <= cols else t.T @ t
        np.testing.assert_allclose(g, 4.0 * np.eye(min(rows, cols)), atol=1e-5)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        init.orthogonal_(gpudiff.empty(3))


def test_trunc_normal():
    t = init.trunc_normal_(gpudiff.empty(100, 100), mean=0.5, std=1.0, a=-1.0, b=1.5).numpy()
    assert t.min() >= -1.0 and t.max() <= 1.5
    r = torch.nn.init.trunc_normal_(torch.empty(100, 100), 0.5, 1.0, -1.0, 1.5).numpy()
    assert abs(t.mean() - r.mean()) < 0.03 and abs(t.std() - r.std()) < 0.03


def test_dirac_makes_identity_conv():
    w = init.dirac_(gpudiff.empty(4, 4, 3, 3)).numpy()
    r = torch.nn.init.dirac_(torch.empty(4, 4, 3, 3)).numpy()
    np.testing.assert_array_equal(w, r)
    w = init.dirac_(gpudiff.empty(6, 3, 3, 3), groups=2).numpy()
    r = torch.nn.init.dirac_(torch.empty(6, 3, 3, 3), groups=2).numpy()
    np.testing.assert_array_equal(w, r)


def test_generator_argument_reproduces():
    g1 = gpudiff.Generator().manual_seed(5)
    g2 = gpudiff.Generator().manual_seed(5)
    a = init.xavier_uniform_(gpudiff.empty(3, 4), generator=g1).numpy()
    b = init.xavier_uniform_(gpudiff.empty(3, 4), generator=g2).numpy()
    np.testing.assert_array_equal(a, b)
