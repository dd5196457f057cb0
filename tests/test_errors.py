"""Errors say what went wrong where: the op, the offending shapes, dtypes or devices."""
import re

import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional as F

needs_cuda = pytest.mark.skipif(not gpudiff.cuda.is_available(), reason="no cuda device")


def raises(exc, *fragments):
    """pytest.raises(exc) whose message contains every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


A, B = gpudiff.randn(3, 4), gpudiff.randn(5, 6)


# ---- shapes ---------------------------------------------------------------------------------
def test_matmul_shape_mismatch_names_op_and_shapes():
    with pytest.raises(RuntimeError) as e:
        A @ B
    assert str(e.value) == "matmul: shapes (3, 4) and (5, 6) do not align (4 != 5)"


@pytest.mark.parametrize("call,fragments", [
    (lambda: gpudiff.mm(A, B), ("(3, 4)", "(5, 6)")),
    (lambda: gpudiff.mm(A, gpudiff.randn(4)), ("mm", "(3, 4)", "(4,)")),
    (lambda: gpudiff.bmm(gpudiff.randn(2, 3, 4), gpudiff.randn(3, 4, 5)),
     ("bmm", "(2, 3, 4)", "(3, 4, 5)")),
    (lambda: gpudiff.matmul(gpudiff.randn(2, 3, 4), gpudiff.randn(2, 5, 6)),
     ("matmul", "(2, 3, 4)", "(2, 5, 6)", "4 != 5")),
    (lambda: A @ gpudiff.tensor(1.0), ("matmul", "(3, 4)", "()")),
    (lambda: gpudiff.dot(gpudiff.randn(3), gpudiff.randn(4)), ("dot", "(3,)", "(4,)")),
    (lambda: F.linear(A, gpudiff.randn(2, 5)), ("linear", "(3, 4)", "(2, 5)")),
])
def test_product_shape_errors(call, fragments):
    with raises(RuntimeError, *fragments):
        call()


@pytest.mark.parametrize("name,call", [
    ("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b),
    ("div", lambda a, b: a / b), ("maximum", gpudiff.maximum), ("pow", lambda a, b: a ** b),
    ("eq", lambda a, b: a == b), ("lt", lambda a, b: a < b),
    ("where", lambda a, b: gpudiff.where(a > 0, a, b)),
])
def test_broadcast_failure_names_op_and_both_shapes(name, call):
    with raises(RuntimeError, name, "(3, 4)", "(5,)", "broadcast"):
        call(A, gpudiff.randn(5))


def test_in_place_broadcast_errors():
    with raises(RuntimeError, "add_", "(3,)", "(2, 3)"):
        gpudiff.randn(3).add_(gpudiff.randn(2, 3))
    x = gpudiff.randn(3, requires_grad=True) * 1.0
    with raises(RuntimeError, "(3,)", "(2, 3)"):
        x.add_(gpudiff.randn(2, 3))
    with raises(RuntimeError, "setitem", "(5,)", "(4,)"):
        gpudiff.randn(3, 4)[0] = gpudiff.randn(5)


@pytest.mark.parametrize("call,fragments", [
    (lambda: A.reshape(5, 3), ("reshape", "[5, 3]", "12", "(3, 4)")),
    (lambda: A.view(-1, 5), ("[-1, 5]", "(3, 4)")),
    (lambda: A.expand(3, 5), ("expand", "(3, 5)", "(3, 4)")),
    (lambda: A.expand(4), ("expand",)),
    (lambda: A.permute(0, 0), ("permute", "(0, 0)", "(3, 4)")),
    (lambda: gpudiff.cat([A, B]), ("cat", "(3, 4)", "(5, 6)")),
    (lambda: gpudiff.stack([A, B]), ("stack", "(3, 4)", "(5, 6)")),
    (lambda: A.split([1, 1], 0), ("split", "3", "[1, 1]")),
    (lambda: A.repeat(2), ("repeat",)),
    (lambda: gpudiff.randn(2, 3, 4).t(), ("t()", "3D")),
    (lambda: A.gather(1, gpudiff.tensor([0])), ("gather", "(1,)", "(3, 4)")),
    (lambda: F.layer_norm(A, (5,)), ("layer_norm", "5", "[3, 4]")),
    (lambda: F.pad(A, (1,)), ("pad", "1")),
])
def test_shape_op_errors(call, fragments):
    with raises(RuntimeError, *fragments):
        call()


def test_dimension_out_of_range():
    for call in (lambda: A.sum(dim=2), lambda: A.softmax(dim=3), lambda: A.mean(dim=-3)):
        with raises(IndexError, "Dimension out of range", "[-2, 1]"):
            call()


def test_index_errors():
    with raises(IndexError, "5", "size 3"):
        A[5]
    with raises(IndexError, "long, int or bool"):
        A[gpudiff.tensor([0.0])]


# ---- dtypes ---------------------------------------------------------------------------------
def test_dtype_errors_name_the_dtypes():
    with raises(RuntimeError, "matmul", "float32", "float64"):
        A @ gpudiff.randn(4, 2, dtype=gpudiff.float64)
    with raises(RuntimeError, "gather", "int64", "float32"):
        A.gather(1, gpudiff.tensor([[0.5]]))
    with raises(RuntimeError, "masked_fill", "bool", "int64"):
        A.masked_fill(gpudiff.tensor([1, 0, 1, 0]), 0.0)
    with raises(RuntimeError, "mean", "int64"):
        gpudiff.tensor([1, 2]).mean()
    with raises(RuntimeError, "one_hot"):
        F.one_hot(gpudiff.tensor([0.0, 1.0]))


def test_integer_tensors_cannot_require_grad():
    for make in (lambda: gpudiff.tensor([1, 2], requires_grad=True),
                 lambda: gpudiff.arange(3).requires_grad_(),
                 lambda: gpudiff.ones(2, dtype=gpudiff.bool, requires_grad=True)):
        with raises(RuntimeError, "floating point"):
            make()


# ---- devices --------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("call", [
    lambda a, c: a + c, lambda a, c: c @ a.t(), lambda a, c: gpudiff.cat([a, c]),
    lambda a, c: gpudiff.where(c > 0, a, a), lambda a, c: F.mse_loss(c, a),
    lambda a, c: F.linear(c, a), lambda a, c: a.add_(c),
])
def test_mixing_cpu_and_cuda_names_both_devices(call):
    a, c = gpudiff.randn(3, 4), gpudiff.randn(3, 4, device="cuda")
    cuda_name = str(c.device)
    assert cuda_name.startswith("cuda:0")
    with raises(RuntimeError, "same device", "cpu", cuda_name):
        call(a, c)


@needs_cuda
def test_cuda_device_reports_emulation():
    c = gpudiff.zeros(1, device="cuda")
    if gpudiff.cuda.is_emulated():
        assert "emulated" in str(c.device) and "emulated" in repr(c.device)
    with raises(RuntimeError, "cuda:7", "does not exist"):
        gpudiff.device("cuda:7")


def test_device_names():
    with raises(RuntimeError, "unknown device type", "'tpu'"):
        gpudiff.device("tpu")
    with pytest.raises(TypeError):
        gpudiff.device(3.5)


@needs_cuda
def test_index_on_other_device():
    a = gpudiff.randn(3)
    with raises(RuntimeError, "indices", "cpu", "cuda"):
        a[gpudiff.tensor([0], device="cuda")]


# ---- losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("call,exc,fragments", [
    (lambda: F.cross_entropy(A, gpudiff.tensor([0, 1])), ValueError,
     ("cross_entropy", "(3,)", "(3, 4)", "(2,)")),
    (lambda: F.cross_entropy(gpudiff.randn(2, 3, 4, 4), gpudiff.tensor([[0, 1]])), ValueError,
     ("cross_entropy", "(2, 4, 4)", "(1, 2)")),
    (lambda: F.cross_entropy(A, gpudiff.randn(3, 5)), ValueError,
     ("cross_entropy", "(3, 5)", "(3, 4)")),
    (lambda: F.cross_entropy(A, gpudiff.tensor([0, 1, 9])), IndexError,
     ("cross_entropy", "9", "4 classes")),
    (lambda: F.cross_entropy(A, gpudiff.tensor([0, 1, 2]), weight=gpudiff.ones(3)),
     RuntimeError, ("cross_entropy", "weight", "(4,)", "(3,)")),
    (lambda: F.cross_entropy(A, gpudiff.tensor([0, 1, 2]), label_smoothing=1.5), ValueError,
     ("label_smoothing",)),
    (lambda: F.nll_loss(A, gpudiff.tensor([0, 1])), ValueError, ("nll_loss", "(3,)", "(2,)")),
    (lambda: F.nll_loss(A, gpudiff.tensor([0, -2, 1])), IndexError, ("nll_loss", "-2")),
    (lambda: F.mse_loss(A, gpudiff.randn(4, 3)), ValueError, ("mse_loss", "(4, 3)", "(3, 4)")),
    (lambda: F.l1_loss(A, gpudiff.randn(3)), ValueError, ("l1_loss", "(3,)", "(3, 4)")),
    (lambda: F.smooth_l1_loss(A, gpudiff.randn(3)), ValueError, ("smooth_l1_loss", "(3,)")),
    (lambda: F.huber_loss(A, gpudiff.randn(3)), ValueError, ("huber_loss", "(3,)")),
    (lambda: F.binary_cross_entropy(A.sigmoid(), gpudiff.rand(3)), ValueError,
     ("binary_cross_entropy", "(3,)", "(3, 4)")),
    (lambda: F.binary_cross_entropy(A * 5, gpudiff.rand(3, 4)), RuntimeError,
     ("binary_cross_entropy", "between 0 and 1")),
    (lambda: F.binary_cross_entropy_with_logits(A, gpudiff.rand(4)), ValueError,
     ("binary_cross_entropy_with_logits", "(4,)", "(3, 4)")),
    (lambda: F.multi_margin_loss(A, gpudiff.tensor([0])), ValueError,
     ("multi_margin_loss", "(3,)", "(1,)")),
    (lambda: F.mse_loss(A, A, reduction="avg"), ValueError, ("mse_loss", "'avg'")),
    (lambda: F.cross_entropy(A, gpudiff.tensor([0.0, 1.0, 2.0])), ValueError,
     ("cross_entropy", "(3,)", "(3, 4)")),
])
def test_loss_argument_errors(call, exc, fragments):
    with raises(exc, *fragments):
        call()


# ---- autograd misuse ------------------------------------------------------------------------
def test_autograd_misuse_messages_say_what_to_do():
    x = gpudiff.randn(3, requires_grad=True)
    with raises(RuntimeError, "gradient"):
        (x * 2).backward()
    with raises(RuntimeError, "detach().numpy()"):
        x.numpy()
    y = (x.exp() * 2).sum()
    y.backward()
    with raises(RuntimeError, "retain_graph=True"):
        y.backward()
    with raises(RuntimeError, "allow_unused=True"):
        gpudiff.autograd.grad((x * 2).sum(), [x, gpudiff.randn(2, requires_grad=True)])
    with raises(RuntimeError, "leaf", "no_grad"):
        x.add_(1)
    with raises(RuntimeError, "ambiguous"):
        bool(x > 0)
    np.testing.assert_equal(x.grad.shape, (3,))
