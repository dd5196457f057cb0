"""Autocast: op output dtypes equal PyTorch's CPU autocast op by op (PyTorch is the oracle on
the CPU) and follow PyTorch's documented CUDA lists on the (emulated) cuda device; casts are
differentiable and cached; regions nest, disable and decorate; bad arguments raise."""
import re

import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional as GF

torch = pytest.importorskip("torch")
TF = torch.nn.functional

rng = np.random.default_rng(0)
A = {  # the inputs, as float32 NumPy arrays
    "x4": rng.standard_normal((2, 3, 8, 8)), "w4": rng.standard_normal((4, 3, 3, 3)),
    "wt4": rng.standard_normal((3, 4, 3, 3)), "x2": rng.standard_normal((4, 5)),
    "y2": rng.standard_normal((4, 5)), "w2": rng.standard_normal((6, 5)),
    "b2": rng.standard_normal(6), "x3": rng.standard_normal((2, 4, 5)),
    "p2": rng.uniform(0.1, 0.9, (4, 5)),
}
A = {k: v.astype(np.float32) for k, v in A.items()}
TARGET = np.array([0, 3, 1, 4])


# name -> (call(m, F, T), CUDA list: 'low' | 'fp32' | None (input dtype))
#   m: gpudiff or torch, F: its nn.functional, T(name): the input as a tensor of the case dtype
OPS = {
    "conv2d": (lambda m, F, T: F.conv2d(T("x4"), T("w4"), padding=1), "low"),
    "conv_transpose2d": (lambda m, F, T: F.conv_transpose2d(T("x4"), T("wt4")), "low"),
    "linear": (lambda m, F, T: F.linear(T("x2"), T("w2"), T("b2")), "low"),
    "matmul": (lambda m, F, T: T("x2") @ T("y2").t(), "low"),
    "mm": (lambda m, F, T: m.mm(T("x2"), T("w2").t()), "low"),
    "bmm": (lambda m, F, T: m.bmm(T("x3"), T("x3").transpose(1, 2)), "low"),
    "relu": (lambda m, F, T: F.relu(T("x2")), None),
    "max_pool2d": (lambda m, F, T: F.max_pool2d(T("x4"), 2), None),
    "avg_pool2d": (lambda m, F, T: F.avg_pool2d(T("x4"), 2), None),
    "adaptive_avg_pool2d": (lambda m, F, T: F.adaptive_avg_pool2d(T("x4"), 1), None),
    "batch_norm": (lambda m, F, T: F.batch_norm(T("x4"), m.zeros(3), m.ones(3), m.ones(3),
                                                m.zeros(3), training=True), None),
    "layer_norm": (lambda m, F, T: F.layer_norm(T("x2"), (5,)), "fp32"),
    "softmax": (lambda m, F, T: F.softmax(T("x2"), 1), "fp32"),
    "log_softmax": (lambda m, F, T: F.log_softmax(T("x2"), 1), "fp32"),
    "cross_entropy": (lambda m, F, T: F.cross_entropy(T("x2"), m.tensor(TARGET)), "fp32"),
    "nll_loss": (lambda m, F, T: F.nll_loss(T("x2"), m.tensor(TARGET)), "fp32"),
    "mse_loss": (lambda m, F, T: F.mse_loss(T("x2"), T("y2")), "fp32"),
    "l1_loss": (lambda m, F, T: F.l1_loss(T("x2"), T("y2")), "fp32"),
    "smooth_l1_loss": (lambda m, F, T: F.smooth_l1_loss(T("x2"), T("y2")), "fp32"),
    "kl_div": (lambda m, F, T: F.kl_div(T("x2"), T("p2"), reduction="batchmean"), "fp32"),
    "bce_with_logits": (lambda m, F, T: F.binary_cross_entropy_with_logits(T("x2"), T("p2")),
                        "fp32"),
    "sum": (lambda m, F, T: T("x2").sum(), "fp32"),
    "mean": (lambda m, F, T: T("x2").mean(), None),
    "prod": (lambda m, F, T: T("p2").prod(), "fp32"),
    "cumsum": (lambda m, F, T: T("x2").cumsum(0), "fp32"),
    "exp": (lambda m, F, T: T("x2").exp(), "fp32"),
    "log": (lambda m, F, T: T("p2").log(), "fp32"),
    "pow": (lambda m, F, T: T("x2").pow(2), "fp32"),
    "rsqrt": (lambda m, F, T: T("p2").rsqrt(), "fp32"),
    "logsumexp": (lambda m, F, T: T("x2").logsumexp(1), "fp32"),
    "add": (lambda m, F, T: T("x2") + T("y2"), None),
    "mul": (lambda m, F, T: T("x2") * 3.0, None),
    "sigmoid": (lambda m, F, T: m.sigmoid(T("x2")), None),
    "tanh": (lambda m, F, T: m.tanh(T("x2")), None),
    "gelu": (lambda m, F, T: F.gelu(T("x2")), None),
    "interpolate": (lambda m, F, T: F.interpolate(T("x4"), scale_factor=2), None),
    "flatten": (lambda m, F, T: T("x4").flatten(1), None),
    "add_mixed": (lambda m, F, T: T("x2") + m.tensor(A["y2"]), "promote"),
    "cat_mixed": (lambda m, F, T: m.cat([T("x2"), m.tensor(A["y2"])]), "promote"),
    "linear_then_softmax": (lambda m, F, T: F.softmax(F.linear(T("x2"), T("w2")), 1), "fp32"),
}

CPU_DTYPES = ["float32", "bfloat16", "float16"]


def _run(m, name, dtype, device="cpu"):
    F = GF if m is gpudiff else TF
    dt = getattr(m, dtype)
    if m is gpudiff:
        def T(k):
            return gpudiff.tensor(A[k], device=device).to(dt)
        with gpudiff.device(device):  # (factories inside the call: on the device too)
            return OPS[name][0](m, F, T)
    else:
        def T(k):
            return torch.from_numpy(A[k]).to(dt)
    return OPS[name][0](m, F, T)


def _name(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("name", list(OPS))
def test_cpu_autocast_dtypes_equal_torch(name, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = _run(torch, name, dtype)
        except RuntimeError:   # (PyTorch refuses some mixes, e.g. float16 with float32 cat)
            pytest.skip("torch refuses this case")
    with gpudiff.autocast("cpu"):
        got = _run(gpudiff, name, dtype)
    assert _name(got.dtype) == _name(expected.dtype), \
        f"{name}({dtype}) under CPU autocast: {got.dtype}, torch gives {expected.dtype}"
    tol = 0.05 if "16" in _name(expected.dtype) else 2e-2
    np.testing.assert_allclose(np.asarray(got.detach().float()), expected.detach().float(),
                               rtol=tol, atol=tol * 2, err_msg=name)


def _cuda_expected(name, dtype):
    policy = OPS[name][1]
    if policy == "low":
        return "float16"
    if policy == "fp32":
        return "float32"
    if policy == "promote":
        return "float32"
    return dtype


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_autocast_follows_pytorch_lists(name, dtype):
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (GPUDIFF_CUDA=emulate)")
    with gpudiff.autocast("cuda"):
        got = _run(gpudiff, name, dtype, "cuda")
    assert got.device.type == "cuda"
    assert str(got.dtype) == _cuda_expected(name, dtype), f"{name}({dtype}) under CUDA autocast"


def test_cuda_autocast_leaves_cpu_tensors_alone():
    x = gpudiff.randn(4, 5)
    with gpudiff.autocast("cuda" if gpudiff.cuda.is_available() else "cpu", enabled=False):
        pass
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda device")
    with gpudiff.autocast("cuda"):
        assert GF.linear(x, gpudiff.randn(3, 5)).dtype == gpudiff.float32


def test_float64_is_never_lowered():
    x = gpudiff.randn(4, 5, dtype=gpudiff.float64)
    with gpudiff.autocast("cpu"):
        assert GF.linear(x, gpudiff.randn(3, 5, dtype=gpudiff.float64)).dtype == gpudiff.float64


# ---- gradients through the casts --------------------------------------------------------
def test_gradients_reach_float32_parameters_in_float32_and_equal_torch():
    x = A["x2"]
    w, b = A["w2"], A["b2"]
    gw, gb = gpudiff.tensor(w, requires_grad=True), gpudiff.tensor(b, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    with gpudiff.autocast("cpu"):
        out = GF.cross_entropy(GF.linear(gpudiff.tensor(x), gw, gb), gpudiff.tensor(TARGET))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tout = TF.cross_entropy(TF.linear(torch.tensor(x), tw, tb), torch.tensor(TARGET))
    assert out.dtype == gpudiff.float32 and gw.requires_grad
    out.backward()
    tout.backward()
    assert gw.grad.dtype == gpudiff.float32 and gb.grad.dtype == gpudiff.float32
    np.testing.assert_allclose(out.item(), tout.item(), rtol=2e-2)
    np.testing.assert_allclose(gw.grad.numpy(), tw.grad.numpy(), rtol=0.05, atol=0.02)
    np.testing.assert_allclose(gb.grad.numpy(), tb.grad.numpy(), rtol=0.05, atol=0.02)


def test_parameter_casts_are_cached_per_region_and_refreshed_after_a_change():
    w = gpudiff.randn(3, 5, requires_grad=True)
    x = gpudiff.randn(4, 5)
    casts = []
    real = gpudiff.runtime.autocast._cast_op

    def counting(t, dt):
        casts.append((id(t), dt))
        return real(t, dt)

    gpudiff.runtime.autocast.set_cast(counting)
    try:
        with gpudiff.autocast("cpu"):
            y1 = GF.linear(x, w)
            y2 = GF.linear(x, w)
            n_w = sum(1 for i, _ in casts if i == id(w))
            assert n_w == 1, "the weight was cast more than once in one region"
            with gpudiff.no_grad():
                w.add_(1.0)  # an in-place change (an optimizer step): the cache is stale
            y3 = GF.linear(x, w)
            assert sum(1 for i, _ in casts if i == id(w)) == 2
        with gpudiff.autocast("cpu", cache_enabled=False):
            GF.linear(x, w)
            GF.linear(x, w)
        assert sum(1 for i, _ in casts if i == id(w)) == 4
    finally:
        gpudiff.runtime.autocast.set_cast(real)
    assert y1.dtype == y2.dtype == y3.dtype == gpudiff.bfloat16
    np.testing.assert_allclose(y3.float().detach().numpy(),
                               (x.numpy() @ w.detach().numpy().T), rtol=0.05, atol=0.1)
    (y1.float().sum() + y2.float().sum()).backward()   # both uses reach w
    np.testing.assert_allclose(w.grad.numpy(), 2 * np.tile(x.numpy().sum(0), (3, 1)),
                               rtol=0.02, atol=0.05)


# ---- regions -----------------------------------------------------------------------------
def test_nested_disabled_and_decorator():
    x, w = gpudiff.randn(2, 5), gpudiff.randn(3, 5)
    assert not gpudiff.is_autocast_enabled("cpu")
    with gpudiff.autocast("cpu"):
        assert gpudiff.is_autocast_enabled("cpu")
        assert GF.linear(x, w).dtype == gpudiff.bfloat16
        with gpudiff.autocast("cpu", enabled=False):
            assert not gpudiff.is_autocast_enabled("cpu")
            assert GF.linear(x, w).dtype == gpudiff.float32
        with gpudiff.autocast("cpu", dtype=gpudiff.float16):
            assert GF.linear(x, w).dtype == gpudiff.float16
            assert gpudiff.get_autocast_dtype("cpu") == gpudiff.float16
        assert GF.linear(x, w).dtype == gpudiff.bfloat16
    assert GF.linear(x, w).dtype == gpudiff.float32

    @gpudiff.amp.autocast("cpu")
    def f(a):
        return GF.linear(a, w)

    assert f(x).dtype == gpudiff.bfloat16 and f(x).dtype == gpudiff.bfloat16
    assert GF.linear(x, w).dtype == gpudiff.float32
    ctx = gpudiff.autocast("cpu")
    with ctx:
        with ctx:   # the same object entered twice
            assert GF.linear(x, w).dtype == gpudiff.bfloat16
    assert not gpudiff.is_autocast_enabled("cpu")
    try:
        with gpudiff.autocast("cpu"):
            raise KeyError("boom")
    except KeyError:
        pass
    assert not gpudiff.is_autocast_enabled("cpu"), "an exception left autocast on"


def test_cuda_amp_spelling():
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (GPUDIFF_CUDA=emulate)")
    x, w = gpudiff.randn(2, 5, device="cuda"), gpudiff.randn(3, 5, device="cuda")
    with gpudiff.cuda.amp.autocast():
        assert GF.linear(x, w).dtype == gpudiff.float16
        assert GF.linear(x, w).softmax(1).dtype == gpudiff.float32
    with gpudiff.amp.autocast("cuda", dtype=gpudiff.bfloat16):
        assert GF.linear(x, w).dtype == gpudiff.bfloat16


@pytest.mark.parametrize("device_type,dtype,words", [
    ("cpu", "float64", ["float64", "'cpu'"]),
    ("cuda", "float32", ["float32", "'cuda'"]),
    ("cpu", "int64", ["int64", "'cpu'"]),
    ("mps", None, ["'mps'"]),
])
def test_unsupported_device_dtype_raises_naming_both(device_type, dtype, words):
    dt = None if dtype is None else getattr(gpudiff, dtype)
    with pytest.raises(RuntimeError) as e:
        gpudiff.autocast(device_type, dtype=dt)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(TypeError, match="device_type"):
        gpudiff.autocast(gpudiff.device("cpu"))


def test_backward_inside_the_region_and_gradient_accumulation_equal_torch():
    """Two micro-batches, each backward inside one autocast region (the cached cast of the
    weight is reused, then remade once a backward released it), as PyTorch allows."""
    w = A["w2"]
    gw = gpudiff.tensor(w, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    with gpudiff.autocast("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in ("x2", "y2"):
            out = GF.cross_entropy(GF.linear(gpudiff.tensor(A[k]), gw), gpudiff.tensor(TARGET))
            out.backward()
            TF.cross_entropy(TF.linear(torch.tensor(A[k]), tw), torch.tensor(TARGET)).backward()
    assert gw.grad.dtype == gpudiff.float32
    np.testing.assert_allclose(gw.grad.numpy(), tw.grad.numpy(), rtol=0.05, atol=0.02)


def test_autocast_inside_a_graph_capture_replays_the_casts():
    """The casts are ops recorded before the op that uses them: a replay recasts the
    parameter after it changed (tests/test_graphs.py trains a captured autocast LeNet)."""
    w, x = gpudiff.randn(3, 5, requires_grad=True), gpudiff.randn(2, 5)
    g = gpudiff.Graph()
    with gpudiff.autocast("cpu"), gpudiff.graph(g):
        y = GF.linear(x, w)
    assert y.dtype == gpudiff.bfloat16
    with gpudiff.no_grad():
        w.mul_(2)
    g.replay()
    with gpudiff.autocast("cpu"):
        np.testing.assert_array_equal(y.detach().float().numpy(), GF.linear(x, w).float().detach()
                                      .numpy())


def test_every_policy_name_is_an_op_or_a_function_that_casts():
    """No dead entries: each name of the policy table is a registered primitive op (cast in
    ops.apply) or a public function that casts its inputs under that name."""
    import inspect

    import gpudiff.functions
    from gpudiff.runtime.autocast import POLICIES
    src = inspect.getsource(GF) + inspect.getsource(gpudiff.functions)
    for device_type, table in POLICIES.items():
        for name in table:
            casts = re.search(r"cast_inputs\(\s*\"" + name + "\"", src)
            assert name in gpudiff.ops.REGISTRY or casts, (device_type, name)
