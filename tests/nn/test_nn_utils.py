"""nn.utils: gradient clipping and parameters <-> vector, against PyTorch."""
import math

import numpy as np
import pytest
import torch

import gpudiff
from gpudiff import nn
from gpudiff.nn.utils import (
    clip_grad_norm_,
    clip_grad_value_,
    parameters_to_vector,
    vector_to_parameters,
)


def pairs(scale=1.0):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    params = [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]
    grads = [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]
    ours, ref = [], []
    for p, g in zip(params, grads):
        a = gpudiff.tensor(p, requires_grad=True)
        a.grad = gpudiff.tensor(g)
        b = torch.tensor(p, requires_grad=True)
        b.grad = torch.tensor(g)
        ours.append(a)
        ref.append(b)
    return ours, ref


@pytest.mark.parametrize("max_norm, norm_type", [(1.0, 2.0), (100.0, 2.0), (0.5, 1),
                                                 (0.3, math.inf), (2.0, 3.0), (1.0, 0)])
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    ours, ref = pairs(scale=2.0)
    tn_ours = clip_grad_norm_(ours, max_norm, norm_type)
    tn_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert isinstance(tn_ours, gpudiff.Tensor) and tn_ours.shape == ()
    np.testing.assert_allclose(float(tn_ours), float(tn_ref), rtol=1e-5)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_single_tensor_no_grads_and_nonfinite():
    p = gpudiff.tensor([3.0, 4.0], requires_grad=True)
    p.grad = gpudiff.tensor([3.0, 4.0])
    assert abs(float(clip_grad_norm_(p, 1.0)) - 5.0) < 1e-6
    np.testing.assert_allclose(p.grad.numpy(), [0.6, 0.8], rtol=1e-5)
    q = gpudiff.zeros(2, requires_grad=True)
    assert float(clip_grad_norm_([q], 1.0)) == 0.0
    q.grad = gpudiff.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([q], 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_on_model():
    m = nn.Linear(4, 3)
    m(gpudiff.randn(8, 4) * 100).sum().backward()
    before = np.sqrt(sum((p.grad.numpy() ** 2).sum() for p in m.parameters()))
    total = clip_grad_norm_(m.parameters(), max_norm=0.5)
    after = np.sqrt(sum((p.grad.numpy() ** 2).sum() for p in m.parameters()))
    np.testing.assert_allclose(float(total), before, rtol=1e-5)
    np.testing.assert_allclose(after, 0.5, rtol=1e-4)


def test_clip_grad_value_matches_torch():
    ours, ref = pairs(scale=2.0)
    assert clip_grad_value_(ours, 0.7) is None
    torch.nn.utils.clip_grad_value_(ref, 0.7)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.grad.numpy(), b.grad.numpy())


def test_parameters_to_vector_and_back():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    v = parameters_to_vector(m.parameters())
    assert v.shape == (11,)
    np.testing.assert_array_equal(
        v.detach().numpy(),
        np.concatenate([p.detach().numpy().ravel() for p in m.parameters()]))
    v.sum().backward()  # differentiable, as torch's
    assert all(float(p.grad.sum()) == p.numel() for p in m.parameters())
    new = gpudiff.arange(11, dtype=gpudiff.float32)
    vector_to_parameters(new, m.parameters())
    assert m[0].weight.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert m[1].bias.tolist() == [10.0]
    assert isinstance(m[0].weight, nn.Parameter)
    with pytest.raises(TypeError, match="expected gpudiff.Tensor"):
        vector_to_parameters(np.zeros(11), m.parameters())
