"""The Tensor API: factories, dtypes, conversions, printing, devices, NumPy/DLPack interop,
indexing, in-place ops, seeding and type promotion, against PyTorch where it has the same."""
import numpy as np
import pytest

import gpudiff

torch = pytest.importorskip("torch")

needs_cuda = pytest.mark.skipif(not gpudiff.cuda.is_available(), reason="no cuda device")


def tname(dtype):
    """'float32' for np.dtype('float32') or torch.float32."""
    return str(dtype).replace("torch.", "")


# ---- factories -----------------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    [1.0, 2.0], [1, 2], [True, False], 3, 2.5, True, [[1, 2], [3, 4]], [], [[1.0], [2]],
    np.array([1, 2], dtype=np.int32), np.array([1.0], dtype=np.float64),
    np.array([1.0], dtype=np.float16), np.float64(2.0), np.array(True),
])
def test_tensor_infers_dtype_as_torch(data):
    g, t = gpudiff.tensor(data), torch.tensor(data)
    assert tname(g.dtype) == tname(t.dtype)
    assert g.shape == tuple(t.shape)
    np.testing.assert_array_equal(g.numpy(), t.numpy())


@pytest.mark.parametrize("name,args", [
    ("zeros", (2, 3)), ("ones", ((2, 3),)), ("empty", (4,)), ("eye", (3,)), ("eye", (2, 3)),
    ("arange", (5,)), ("arange", (1, 4)), ("arange", (0.0, 1.0, 0.25)), ("arange", (1, 7, 2)),
    ("linspace", (0, 1, 5)), ("full", ((2, 2), 7)), ("full", ((2,), 1.5)),
    ("full", ((2,), True)),
])
def test_factories_match_torch(name, args):
    g, t = getattr(gpudiff, name)(*args), getattr(torch, name)(*args)
    assert tname(g.dtype) == tname(t.dtype), name
    assert g.shape == tuple(t.shape)
    if name != "empty":
        np.testing.assert_allclose(g.numpy(), t.numpy(), rtol=1e-6)


def test_factories_dtype_device_requires_grad():
    z = gpudiff.zeros(2, 3, dtype=gpudiff.float64, requires_grad=True)
    assert z.dtype == gpudiff.float64 and z.requires_grad and z.is_leaf
    assert gpudiff.ones(3, dtype=gpudiff.int64).dtype == np.int64
    x = gpudiff.tensor([[1.0, 2.0]])
    for fn in (gpudiff.zeros_like, gpudiff.ones_like, gpudiff.randn_like):
        y = fn(x)
        assert y.shape == x.shape and y.dtype == x.dtype and not y.requires_grad
    f = gpudiff.full_like(x, 3)
    assert f.dtype == x.dtype and (f.numpy() == 3).all()
    assert gpudiff.zeros_like(x, dtype=gpudiff.int32).dtype == np.int32


def test_random_factories():
    gpudiff.manual_seed(0)
    r, n = gpudiff.rand(1000), gpudiff.randn(2, 500)
    assert r.dtype == gpudiff.float32 and n.shape == (2, 500)
    assert 0 <= r.numpy().min() and r.numpy().max() < 1
    assert abs(n.numpy().mean()) < 0.1 and abs(n.numpy().std() - 1) < 0.1
    i = gpudiff.randint(3, 7, (100,))
    assert i.dtype == gpudiff.int64 and i.numpy().min() >= 3 and i.numpy().max() < 7
    assert sorted(gpudiff.randperm(5).tolist()) == [0, 1, 2, 3, 4]


def test_from_numpy_shares_memory_and_as_tensor():
    a = np.arange(4.0)
    t = gpudiff.from_numpy(a)
    a[0] = 10
    assert t[0].item() == 10.0 and t.dtype == np.float64
    assert gpudiff.as_tensor(a).numpy() is not None
    c = gpudiff.tensor(a)  # a copy
    a[1] = 20
    assert c[1].item() == 1.0
    assert gpudiff.as_tensor(t) is t
    assert gpudiff.as_tensor([1, 2], dtype=gpudiff.float32).dtype == np.float32
    with pytest.raises(TypeError):
        gpudiff.from_numpy([1, 2])


# ---- dtypes and conversions --------------------------------------------------------------------
def test_dtype_names_are_the_numpy_dtypes():
    assert gpudiff.float32 == np.float32 and gpudiff.float64 == np.float64
    assert gpudiff.float16 == np.float16 and gpudiff.int64 == np.int64
    assert gpudiff.int32 == np.int32 and gpudiff.bool == np.bool_
    assert gpudiff.get_default_dtype() == gpudiff.float32


def test_dtype_conversion_methods():
    x = gpudiff.tensor([1.7, -2.2])
    assert x.double().dtype == np.float64 and x.half().dtype == np.float16
    assert x.float().dtype == np.float32
    assert x.long().dtype == np.int64 and x.long().tolist() == [1, -2]  # truncation (torch)
    assert x.int().dtype == np.int32 and x.bool().tolist() == [True, True]
    assert x.to(gpudiff.float64).dtype == np.float64
    assert x.to(dtype=gpudiff.int64).tolist() == [1, -2]
    assert x.float() is x  # no-op conversions return the tensor itself, as torch
    y = gpudiff.tensor([1, 2]).to(x)  # to(other): its dtype and device
    assert y.dtype == x.dtype


def test_set_default_dtype():
    try:
        gpudiff.set_default_dtype(gpudiff.float64)
        assert gpudiff.tensor([1.0]).dtype == np.float64
        assert gpudiff.zeros(2).dtype == np.float64
        assert (gpudiff.tensor([1, 2]) * 0.5).dtype == np.float64
    finally:
        gpudiff.set_default_dtype(gpudiff.float32)
    assert gpudiff.tensor([1.0]).dtype == np.float32


def test_attributes():
    x = gpudiff.zeros(2, 3, 4)
    assert x.shape == (2, 3, 4) and x.ndim == 3 and x.dim() == 3
    assert x.size() == (2, 3, 4) and x.size(1) == 3 and x.size(-1) == 4
    assert x.numel() == 24 and len(x) == 2
    assert x.T.shape == (4, 3, 2) and x.device.type == "cpu" and not x.is_cuda
    assert x.is_leaf and x.grad_fn is None and x.grad is None and not x.requires_grad
    d = x.data
    assert d.shape == x.shape and not d.requires_grad
    assert gpudiff.tensor(5.0).dim() == 0


def test_data_shares_memory_outside_the_graph():
    w = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    w.data.mul_(2)   # the classic manual update, no graph, no error
    assert w.detach().tolist() == [2.0, 4.0] and w.requires_grad


# ---- item / tolist / numpy ---------------------------------------------------------------------
def test_item_and_tolist():
    assert gpudiff.tensor(3.5).item() == 3.5 and isinstance(gpudiff.tensor(3).item(), int)
    assert isinstance(gpudiff.tensor([True]).item(), bool)
    assert gpudiff.tensor([[2.0]]).item() == 2.0
    with pytest.raises(RuntimeError, match="3 elements"):
        gpudiff.tensor([1.0, 2.0, 3.0]).item()
    assert gpudiff.tensor([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    assert gpudiff.tensor(2.0).tolist() == 2.0
    assert float(gpudiff.tensor([2.5])) == 2.5 and int(gpudiff.tensor(7)) == 7
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(gpudiff.tensor([1.0, 2.0]))
    assert bool(gpudiff.tensor([1.0])) is True


def test_numpy_rules():
    x = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="detach"):
        x.numpy()
    a = x.detach().numpy()
    assert isinstance(a, np.ndarray) and a.tolist() == [1.0, 2.0]
    y = gpudiff.tensor([1.0, 2.0])
    y.numpy()[0] = 5.0   # numpy() shares memory on the CPU (as torch)
    assert y[0].item() == 5.0


def test_array_protocol():
    x = gpudiff.tensor([[1, 2], [3, 4]], dtype=gpudiff.float64)
    a = np.asarray(x)
    assert a.dtype == np.float64 and a.tolist() == [[1, 2], [3, 4]]
    assert np.asarray(x, dtype=np.float32).dtype == np.float32
    assert np.array(gpudiff.tensor([1.0], requires_grad=True)).tolist() == [1.0]
    # ndarray on the left defers to the tensor's reflected operator
    r = np.ones(2) + gpudiff.tensor([1.0, 2.0], dtype=gpudiff.float64)
    assert isinstance(r, gpudiff.Tensor) and r.tolist() == [2.0, 3.0]


def test_dlpack_round_trip():
    x = gpudiff.arange(6.0).reshape(2, 3)
    t = torch.from_dlpack(x)           # torch reads our memory: zero copy
    assert t.shape == (2, 3) and t[1, 2].item() == 5.0
    t[0, 0] = 42.0
    assert x[0, 0].item() == 42.0
    back = gpudiff.from_dlpack(torch.arange(4, dtype=torch.float64))
    assert back.dtype == np.float64 and back.tolist() == [0.0, 1.0, 2.0, 3.0]
    y = gpudiff.from_dlpack(np.arange(3))
    assert y.tolist() == [0, 1, 2] and y.dtype == np.int64
    z = gpudiff.from_dlpack(x)
    z[1, 1] = -1.0
    assert x[1, 1].item() == -1.0


# ---- repr --------------------------------------------------------------------------------------
def test_repr_like_torch():
    assert repr(gpudiff.tensor([1.0, 2.0])) == "tensor([1., 2.])"
    assert repr(gpudiff.tensor([1, 2])) == "tensor([1, 2])"
    assert repr(gpudiff.tensor(True)) == "tensor(True)"
    assert repr(gpudiff.tensor([1.5], dtype=gpudiff.float64)) == \
        "tensor([1.5000], dtype=gpudiff.float64)"
    assert repr(gpudiff.tensor([1.0], requires_grad=True)) == \
        "tensor([1.], requires_grad=True)"
    r = repr(gpudiff.tensor([1.0], requires_grad=True) * 2)
    assert r.startswith("tensor([2.], grad_fn=<mul") and r.endswith("Backward>)")
    assert repr(gpudiff.tensor([[1.0, 2.0], [3.0, 4.0]])) == \
        "tensor([[1., 2.],\n        [3., 4.]])"
    assert "dtype=gpudiff.int32" in repr(gpudiff.tensor([1], dtype=gpudiff.int32))


@pytest.mark.parametrize("data", [[1.5, 2.0], [1e-5, 1.0], [1e10, 1.5], [0.1, 0.25, 3.0],
                                  [float("nan"), 1.0, 2.5], [[1.25, 2], [3, 4]], [-0.5], [],
                                  [[1, 2], [3, 4]], [True, False]])
def test_repr_formats_numbers_as_torch(data):
    assert repr(gpudiff.tensor(data)).replace("gpudiff", "torch") == repr(torch.tensor(data))


@needs_cuda
def test_repr_on_cuda_names_the_device():
    r = repr(gpudiff.tensor([1.0], device="cuda"))
    assert "device='cuda" in r
    if gpudiff.cuda.is_emulated():
        assert "emulated" in r


# ---- devices -----------------------------------------------------------------------------------
def test_device_objects():
    d = gpudiff.device("cpu")
    assert d.type == "cpu" and d == "cpu" and gpudiff.tensor([1]).device == d
    with pytest.raises(RuntimeError, match="unknown device"):
        gpudiff.device("tpu")


@needs_cuda
def test_to_cuda_and_back():
    x = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    y = x.cuda()
    assert y.device.type == "cuda" and y.is_cuda and y.grad_fn is not None
    assert y.device == gpudiff.device("cuda:0") and y.device == x.to("cuda").device
    if gpudiff.cuda.is_emulated():
        assert y.device.emulated and "emulated" in str(y.device)
        assert "emulated" in gpudiff.cuda.get_device_name()
    z = (y * 3).cpu()
    assert z.device.type == "cpu"
    z.sum().backward()
    assert x.grad.device.type == "cpu" and x.grad.tolist() == [3.0, 3.0]
    c = gpudiff.tensor([1.0]).to("cuda", gpudiff.float64)
    assert c.dtype == np.float64 and c.is_cuda
    assert gpudiff.zeros(2, device="cuda").is_cuda
    assert gpudiff.randn(2, device="cuda").is_cuda


@needs_cuda
def test_cuda_tensor_to_numpy_needs_cpu():
    x = gpudiff.tensor([1.0], device="cuda")
    with pytest.raises(TypeError, match="cpu"):
        x.numpy()
    assert x.cpu().numpy().tolist() == [1.0]
    assert x.tolist() == [1.0] and x.item() == 1.0


@needs_cuda
def test_to_same_device_is_a_no_op_and_copies_otherwise():
    x = gpudiff.tensor([1.0])
    assert x.to("cpu") is x and x.cpu() is x
    y = x.cuda()
    y.add_(1)   # a copy: x is unchanged
    assert x.item() == 1.0 and y.item() == 2.0


# ---- indexing ----------------------------------------------------------------------------------
def _idx_pair():
    a = np.arange(24.0).reshape(4, 3, 2)
    return a, gpudiff.tensor(a), torch.tensor(a)


@pytest.mark.parametrize("key", [
    0, -1, (1, 2), (1, 2, 0), slice(1, 3), (slice(None), 1), (Ellipsis, 1), (None, 0),
    (slice(None, None, 2), slice(1, None)), ([0, 3, 0],), ((0, 2),),
    "long", "bool", "bool_rows", "long_2d", "long_and_slice", "two_long", "zero_d",
])
def test_indexing_forms_match_torch(key):
    a, g, t = _idx_pair()
    if isinstance(key, str):
        keys = {
            "long": lambda lib: lib.tensor([3, 0, 3]),
            "bool": lambda lib: lib.tensor(a) > 10,
            "bool_rows": lambda lib: lib.tensor([True, False, True, True]),
            "long_2d": lambda lib: lib.tensor([[0, 1], [1, 3]]),
            "long_and_slice": lambda lib: (slice(None), lib.tensor([2, 0])),
            "two_long": lambda lib: (lib.tensor([0, 1]), slice(None), lib.tensor([1, 0])),
            "zero_d": lambda lib: lib.tensor(2),
        }[key]
        gk, tk = keys(gpudiff), keys(torch)
    else:
        gk = tk = key
    np.testing.assert_array_equal(g[gk].numpy(), t[tk].numpy())


def test_setitem_forms_match_torch():
    _, g, t = _idx_pair()
    for lib, x in ((gpudiff, g), (torch, t)):
        x[0] = 1.0
        x[1, :, 0] = lib.tensor([7.0, 8.0, 9.0], dtype=lib.float64)
        x[x > 20] = -1.0
        x[lib.tensor([2, 3]), 1] = 5.0
        x[..., 1] += 0.5
    np.testing.assert_array_equal(g.numpy(), t.numpy())


def test_index_with_wrong_dtype_raises():
    x = gpudiff.arange(4.0)
    with pytest.raises(IndexError, match="long, int or bool"):
        x[gpudiff.tensor([0.0, 1.0])]


# ---- in-place ops ------------------------------------------------------------------------------
def test_in_place_ops_match_torch():
    res = []
    for lib in (gpudiff, torch):
        x = lib.tensor([[1.0, -2.0], [3.0, 4.0]])
        x.add_(1).sub_(lib.tensor([0.5, 0.5]), alpha=2).mul_(3).div_(2)
        x.clamp_(-2.0, 5.0)
        x.add_(2, alpha=3)
        y = lib.ones(2, 2)
        y.copy_(x)
        y.fill_(0.25)
        z = lib.zeros(3).fill_(2).zero_()
        res.append((x.numpy().copy(), y.numpy().copy(), z.numpy().copy()))
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b)


def test_in_place_ops_return_self_and_bump_version():
    x = gpudiff.zeros(3)
    v = x._version[0]
    assert x.add_(1) is x and x.mul_(2) is x
    assert x._version[0] == v + 2
    x += 1
    assert x.tolist() == [3.0, 3.0, 3.0]


def test_in_place_keeps_dtype():
    x = gpudiff.tensor([1, 2, 3])
    x.mul_(2)
    assert x.dtype == np.int64 and x.tolist() == [2, 4, 6]
    y = gpudiff.tensor([1.0, 2.0])
    y.copy_(gpudiff.tensor([3, 4]))
    assert y.dtype == np.float32 and y.tolist() == [3.0, 4.0]


def test_uniform_normal_in_place():
    gpudiff.manual_seed(3)
    x = gpudiff.empty(2000).uniform_(-2, 3)
    assert -2 <= x.numpy().min() and x.numpy().max() < 3
    y = gpudiff.empty(2000).normal_(5.0, 0.5)
    assert abs(y.numpy().mean() - 5.0) < 0.05 and abs(y.numpy().std() - 0.5) < 0.05
    w = gpudiff.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        w.normal_()
    with gpudiff.no_grad():
        w.normal_()
    assert w.requires_grad


def test_detach_shares_memory_and_version():
    x = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    d = x.detach()
    with gpudiff.no_grad():
        x.add_(1)
    assert d.tolist() == [2.0, 3.0]
    assert d._version is x._version


def test_clone_and_contiguous():
    x = gpudiff.arange(6.0).reshape(2, 3)
    c = x.clone()
    c[0, 0] = 9
    assert x[0, 0].item() == 0.0
    t = x.t()
    assert not t.is_contiguous() and t.contiguous().is_contiguous()
    assert x.contiguous() is x
    np.testing.assert_array_equal(t.contiguous().numpy(), x.numpy().T)


# ---- seeding -----------------------------------------------------------------------------------
def test_manual_seed_reproducible():
    gpudiff.manual_seed(123)
    a = (gpudiff.randn(5), gpudiff.rand(3), gpudiff.randint(0, 10, (4,)), gpudiff.randperm(6))
    gpudiff.manual_seed(123)
    b = (gpudiff.randn(5), gpudiff.rand(3), gpudiff.randint(0, 10, (4,)), gpudiff.randperm(6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    gpudiff.manual_seed(124)
    assert not np.array_equal(gpudiff.randn(5).numpy(), a[0].numpy())


def test_rng_state_round_trip_and_generator():
    gpudiff.manual_seed(7)
    state = gpudiff.get_rng_state()
    a = gpudiff.randn(4)
    gpudiff.set_rng_state(state)
    np.testing.assert_array_equal(gpudiff.randn(4).numpy(), a.numpy())
    g = gpudiff.Generator().manual_seed(1)
    x = gpudiff.randn(3, generator=g)
    g.manual_seed(1)
    np.testing.assert_array_equal(gpudiff.randn(3, generator=g).numpy(), x.numpy())


@needs_cuda
def test_manual_seed_same_numbers_on_cpu_and_cuda():
    gpudiff.manual_seed(5)
    a = gpudiff.randn(6)
    gpudiff.manual_seed(5)
    b = gpudiff.randn(6, device="cuda")
    np.testing.assert_array_equal(a.numpy(), b.cpu().numpy())
    gpudiff.cuda.manual_seed(5)
    np.testing.assert_array_equal(gpudiff.randn(6).numpy(), a.numpy())


# ---- promotion -----------------------------------------------------------------------------------
SCALARS = [2, 2.5, True, -3]
TENSORS = [("float32", [1.0, 2.0]), ("float64", [1.0, 2.0]), ("float16", [1.0, 2.0]),
           ("int64", [1, 2]), ("int32", [1, 2]), ("bool", [True, False])]
OPS = {"add": lambda a, b: a + b, "radd": lambda a, b: b + a, "mul": lambda a, b: a * b,
       "sub": lambda a, b: a - b, "rsub": lambda a, b: b - a, "div": lambda a, b: a / b,
       "rdiv": lambda a, b: b / a, "pow": lambda a, b: a ** b, "rpow": lambda a, b: b ** a,
       "eq": lambda a, b: a == b,
       "lt": lambda a, b: a < b, "floordiv": lambda a, b: a // b}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype,data", TENSORS)
@pytest.mark.parametrize("scalar", SCALARS)
def test_python_scalar_promotion_matches_torch(op, dtype, data, scalar):
    f = OPS[op]
    t = torch.tensor(data, dtype=getattr(torch, dtype))
    try:
        expected = f(t, scalar)
    except (RuntimeError, TypeError):
        pytest.skip("torch rejects this combination")
    g = gpudiff.tensor(data, dtype=getattr(gpudiff, dtype))
    with np.errstate(all="ignore"):
        got = f(g, scalar)
    assert tname(got.dtype) == tname(expected.dtype)
    np.testing.assert_allclose(got.numpy().astype(np.float64),
                               expected.numpy().astype(np.float64), rtol=1e-3)


@pytest.mark.parametrize("a", [("float32", 1), ("float64", 0), ("int64", 1), ("int32", 0),
                               ("bool", 1), ("float16", 1), ("int64", 0), ("float64", 1)])
@pytest.mark.parametrize("b", [("float32", 1), ("float64", 0), ("int64", 1), ("int32", 1),
                               ("bool", 0), ("float16", 0), ("uint8", 1)])
def test_tensor_tensor_promotion_matches_torch(a, b):
    (da, na), (db, nb) = a, b

    def make(lib, dt, nd):
        x = lib.ones((2,) * nd, dtype=getattr(lib, dt))
        return x
    got = make(gpudiff, da, na) + make(gpudiff, db, nb)
    expected = make(torch, da, na) + make(torch, db, nb)
    assert tname(got.dtype) == tname(expected.dtype)


@pytest.mark.parametrize("dtypes", [("int64", "float32"), ("bool", "int32"), ("float16", "int64"),
                                    ("float32", "float64"), ("uint8", "int8"),
                                    ("bool", "bool", "float16")])
def test_cat_stack_promotion_matches_torch(dtypes):
    for fn in ("cat", "stack"):
        g = getattr(gpudiff, fn)([gpudiff.ones(2, dtype=getattr(gpudiff, d)) for d in dtypes])
        t = getattr(torch, fn)([torch.ones(2, dtype=getattr(torch, d)) for d in dtypes])
        assert tname(g.dtype) == tname(t.dtype), fn


# ---- PyTorch spellings that a new user tries (docs/API.md's gap list) ---------------------
def test_randint_high_and_size_only():
    t = gpudiff.randint(10, (3,))
    assert t.shape == (3,) and t.dtype == gpudiff.int64
    assert 0 <= t.min().item() <= t.max().item() < 10
    assert gpudiff.randint(2, 5, (2, 2)).shape == (2, 2)


def test_new_factories_follow_their_device_and_dtype_arguments():
    x = gpudiff.ones(2)
    assert x.new_zeros((3,)).shape == (3,) and x.new_ones(3).tolist() == [1.0, 1.0, 1.0]
    assert x.new_full((2,), 7.0).tolist() == [7.0, 7.0]
    assert x.new_zeros(2, dtype=gpudiff.int64).dtype == gpudiff.int64
    if gpudiff.cuda.is_available():
        assert x.new_zeros(2, device="cuda").device.type == "cuda"
        assert x.new_empty(2, device="cuda").device.type == "cuda"


def test_where_with_two_numbers():
    c = gpudiff.tensor([True, False])
    assert gpudiff.where(c, 1.0, 0.0).tolist() == [1.0, 0.0]
    assert gpudiff.where(c, 1.0, 0.0).dtype == gpudiff.float32
    assert gpudiff.where(c, 1, 0).dtype == gpudiff.int64


@pytest.mark.parametrize("args,kw", [((0, True), {}), ((0, False), {}), ((True,), {}),
                                     ((1,), {"keepdim": True}), ((), {"correction": 0}),
                                     ((0, True, True), {})])
def test_var_std_accept_torch_positional_spellings(args, kw):
    import torch
    a = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    for name in ("var", "std"):
        got = getattr(gpudiff.tensor(a), name)(*args, **kw).numpy()
        want = getattr(torch.tensor(a), name)(*args, **kw).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6)
