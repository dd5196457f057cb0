"""The one recording path (autograd/function.py): built-in ops and custom Functions share
FunctionCtx and record(); ctx.mark_dirty as in PyTorch; the default device of factories."""
import numpy as np
import pytest
import torch

import gpudiff
from gpudiff.autograd import Function, FunctionCtx
from gpudiff.ops import conv as conv_ops
from gpudiff.ops import elementwise


def _double_inplace(lib):
    """A Function that doubles its input in place, marks it dirty and returns it."""
    class Double(lib.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x.mul_(2)
            ctx.mark_dirty(x)
            return x

        @staticmethod
        def backward(ctx, gy):
            return gy * 2
    return Double


def test_ops_and_functions_record_through_the_same_context():
    x = gpudiff.randn(3, requires_grad=True)
    y = x.exp()
    assert type(y.grad_fn.ctx) is FunctionCtx and y.grad_fn.name == "exp"

    class Square(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, gy):
            x, = ctx.saved_tensors
            return 2 * x * gy

    z = Square.apply(x)
    assert type(z.grad_fn.ctx) is FunctionCtx and z.grad_fn.name == "Square"
    z.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.detach().numpy(), rtol=1e-6)


def _version(t):
    return t._version[0] if isinstance(t, gpudiff.Tensor) else t._version


def test_mark_dirty_returns_the_input_bumps_its_version_and_rebases_it():
    seen = {}
    for lib in (gpudiff, torch):
        a = lib.tensor([1.0, -2.0, 3.0], requires_grad=True)
        x = a * 3                       # a non-leaf: in-place changes are allowed
        v0 = _version(x)
        y = _double_inplace(lib).apply(x)
        assert y is x                   # the same tensor object comes back
        seen[lib.__name__] = _version(x) - v0
        assert "Double" in repr(x.grad_fn)  # its history is the Function's node
        (x * x).sum().backward()        # d/da (6a)^2 = 72 a
        np.testing.assert_allclose(a.grad.numpy(), 72 * np.array([1.0, -2.0, 3.0]), rtol=1e-6)
    # the forward's mul_ and mark_dirty each count, in both
    assert seen["gpudiff"] == seen["torch"] == 2


def test_mark_dirty_matches_torch_through_a_longer_graph():
    def run(lib):
        a = lib.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=lib.float64, requires_grad=True)
        x = a * 2.0 + 1.0               # (a.exp() would save its output: then stale)
        y = _double_inplace(lib).apply(x)
        loss = (y.sin() * a).sum()
        loss.backward()
        return loss.item(), a.grad.numpy()
    (l1, g1), (l2, g2) = run(gpudiff), run(torch)
    assert l1 == pytest.approx(l2)
    np.testing.assert_allclose(g1, g2, rtol=1e-12)


def test_mark_dirty_on_a_leaf_that_requires_grad_raises():
    a = gpudiff.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _double_inplace(gpudiff).apply(a)


def test_a_tensor_saved_before_the_dirty_change_raises_at_backward():
    a = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    x = a * 1
    z = x * x                           # saves x at version v
    _double_inplace(gpudiff).apply(x)   # x changes: z's saved x is stale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_a_view_taken_before_the_dirty_change_raises_when_used():
    a = gpudiff.tensor([1.0, 2.0, 3.0], requires_grad=True)
    x = a * 1
    v = x[1:]
    _double_inplace(gpudiff).apply(x)
    with pytest.raises(RuntimeError, match="view of a tensor that was modified"):
        v * 2


def test_mark_dirty_without_grad_still_bumps_the_version():
    x = gpudiff.ones(2)
    v0 = x._version[0]
    y = _double_inplace(gpudiff).apply(x)
    assert y is x and x._version[0] == v0 + 2 and x.tolist() == [2.0, 2.0]  # mul_ + dirty


def test_a_dirty_input_must_be_returned():
    class Bad(Function):
        @staticmethod
        def forward(ctx, x):
            x.add_(1)
            ctx.mark_dirty(x)
            return x * 1

        @staticmethod
        def backward(ctx, gy):
            return gy

    with pytest.raises(RuntimeError, match="must be returned"):
        Bad.apply(gpudiff.ones(2, requires_grad=True) * 1)


def test_set_materialize_grads_false_passes_none_for_unused_outputs():
    seen = []

    class Two(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.set_materialize_grads(False)
            return x * 1, x * 2

        @staticmethod
        def backward(ctx, g1, g2):
            seen.append((g1 is None, g2 is None))
            return g1 if g1 is not None else g2 * 2

    x = gpudiff.ones(2, requires_grad=True)
    _, b = Two.apply(x)
    b.sum().backward()
    assert seen == [(True, False)]
    assert x.grad.tolist() == [2.0, 2.0]


def test_op_classes_are_named_as_their_registry_names():
    from gpudiff.ops import REGISTRY
    for name, cls in REGISTRY.items():
        assert cls.__name__ == name, (name, cls.__name__)
    assert conv_ops.conv2d.name == "conv2d" and elementwise.add.name == "add"


# ---- the default device --------------------------------------------------------------------
def test_default_device_starts_on_the_cpu_and_can_be_set():
    assert gpudiff.get_default_device() == gpudiff.device("cpu")
    try:
        gpudiff.set_default_device("cpu")
        assert gpudiff.zeros(2).device.type == "cpu"
    finally:
        gpudiff.set_default_device(None)


@pytest.mark.parametrize("cuda", ["emulate"], indirect=False)
def test_with_device_sets_the_factories_default_for_the_block(cuda):
    if not gpudiff.cuda.is_available():
        pytest.skip("needs the cuda device (GPUDIFF_CUDA=emulate is set by tests/conftest.py)")
    x = gpudiff.randn(4, 3).cuda()
    with gpudiff.device("cuda"):
        assert gpudiff.get_default_device().type == "cuda"
        for t in (gpudiff.zeros(2), gpudiff.arange(3), gpudiff.tensor([1, 2]),
                  gpudiff.randn(2), gpudiff.full((2,), 1.0), gpudiff.eye(2)):
            assert t.device.type == "cuda"
        # a function that makes its index / target tensors itself finds them beside x
        target = gpudiff.tensor([0, 2, 1, 0])
        loss = gpudiff.nn.functional.cross_entropy(x, target)
        assert loss.device.type == "cuda"
        assert gpudiff.zeros(1, device="cpu").device.type == "cpu"  # explicit wins
    assert gpudiff.zeros(2).device.type == "cpu"
    try:
        gpudiff.set_default_device("cuda")
        assert gpudiff.ones(1).device.type == "cuda"
        with gpudiff.device("cpu"):
            assert gpudiff.ones(1).device.type == "cpu"
        assert gpudiff.ones(1).device.type == "cuda"
    finally:
        gpudiff.set_default_device("cpu")
