"""Generic op tests driven by the op database (tests/opdb): for every entry x sample x device,

- forward vs PyTorch CPU (values, shapes, dtypes, requires_grad of the outputs; inputs left
  unchanged), float64 tight and float32 loose;
- backward vs PyTorch with a random upstream gradient (through ``.grad`` of the leaves);
- float64 finite-difference gradcheck and, where the entry says so, gradgradcheck;
- the device's fast kernels vs the NumPy reference (``use_kernels(False)``);
- CPU vs CUDA (the emulated device in CI);
- every registered primitive op has an entry, and each entry really runs what it claims.
"""
import zlib

import numpy as np
import pytest
from opdb import NOT_YET_COVERED, OPS, Const, device_params, float64

import gpudiff
from gpudiff import runtime
from gpudiff.autograd import gradcheck, gradgradcheck

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny tensors: threads only add noise on the shared cores

DEVICES = device_params()
BY_NAME = {e.name: e for e in OPS}


@pytest.fixture(autouse=True)
def fp32_convolutions():
    """The op database compares float32 results at float32 tolerances: TF32 off.
    (gpudiff.backends.cudnn.allow_tf32, True by default as PyTorch's, runs float32 CUDA
    convolutions on the TF32 tensor cores; tests/cuda/test_tensor_core.py tests those against
    a TF32-rounded reference.)"""
    cudnn = gpudiff.backends.cudnn
    old, cudnn.allow_tf32 = cudnn.allow_tf32, False
    yield
    cudnn.allow_tf32 = old


# tolerance of kernel vs reference and CPU vs CUDA: the same maths, another summation order
SAME_MATH_TOL = {np.dtype("float64"): (1e-10, 1e-12), np.dtype("float32"): (2e-5, 2e-6),
                 np.dtype("float16"): (5e-3, 5e-3), gpudiff.bfloat16: (2e-2, 2e-2)}
BF16 = gpudiff.bfloat16


def _is_float(dt):
    return dt.kind == "f" or dt == BF16


def _torch_from(a):
    """A NumPy array as a torch tensor (bfloat16, which torch.from_numpy lacks, via float32)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)


def _cases(check=None, dtypes=None):
    """pytest params (entry name, dtype, sample index) for the entries passing ``check``."""
    out = []
    for e in OPS:
        if check is not None and not check(e):
            continue
        for dt in e.dtypes:
            if dtypes is not None and dt not in dtypes:
                continue
            for i, s in enumerate(e.make_samples(dt)):
                if dt.name in s.skip:
                    continue
                out.append(pytest.param(e.name, dt, i, id=f"{e.name}-{dt.name}-{i}:{s.name}"))
    return out


def _sample(name, dtype, i):
    e = BY_NAME[name]
    return e, e.make_samples(dtype)[i]


# ---- building inputs ------------------------------------------------------------------
def _copy(a):
    """A copy of ``a`` that keeps its (non-)contiguity."""
    if a.flags.c_contiguous or a.ndim == 0:
        return a.copy()
    if a.ndim == 1:
        b = np.zeros(2 * a.shape[0], a.dtype)
        b[::2] = a
        return b[::2]
    b = np.empty_like(a, order="K")
    b[...] = a
    return b


def _map(fn, args):
    if isinstance(args, tuple):
        return tuple(_map(fn, a) for a in args)
    if isinstance(args, list):
        return [_map(fn, a) for a in args]
    if isinstance(args, dict):
        return {k: _map(fn, v) for k, v in args.items()}
    return fn(args)


def gpudiff_inputs(sample, device, requires_grad=True):
    """(args, kwargs, leaves): the sample as gpudiff tensors on ``device``."""
    dev = gpudiff.device(device)
    leaves = []

    def conv(a):
        const = isinstance(a, Const)
        if const:
            a = a.array
        if not isinstance(a, np.ndarray):
            return a
        t = gpudiff.Tensor._make(runtime.to_device(_copy(a), dev), dev)
        if requires_grad and not const and _is_float(a.dtype):
            t.requires_grad_()
            leaves.append(t)
        return t

    return _map(conv, sample.args), _map(conv, sample.kwargs), leaves


def torch_inputs(sample, requires_grad=True):
    leaves = []

    def conv(a):
        const = isinstance(a, Const)
        if const:
            a = a.array
        if not isinstance(a, np.ndarray):
            return a
        t = _torch_from(np.array(a))
        if requires_grad and not const and _is_float(a.dtype):
            t.requires_grad_()
            leaves.append(t)
        return t

    return _map(conv, sample.args), _map(conv, sample.kwargs), leaves


def flat(out):
    if isinstance(out, (tuple, list)):
        return [y for o in out for y in flat(o)]
    return [out]


def host(t):
    """A gpudiff or torch tensor (or None) as a NumPy array."""
    if isinstance(t, gpudiff.Tensor):
        return np.asarray(runtime.to_numpy(t.array))
    if t.dtype == torch.bfloat16:
        return t.detach().float().numpy().astype(BF16)
    return t.detach().numpy()


def assert_close(actual, expected, rtol, atol, what):
    a, e = host(actual), host(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != torch's {e.shape}"
    if _is_float(a.dtype) or _is_float(e.dtype):
        a, e = a.astype(np.float64), e.astype(np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def upstream(outs, seed):
    """Random upstream gradients (NumPy) for the outputs that require grad."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(o.shape).astype(host(o).dtype) for o in outs]


def run_gpudiff(entry, sample, device, backward=True):
    """Forward (and backward with a seeded upstream gradient) on ``device``.

    Returns (outputs, leaf grads) as NumPy arrays."""
    args, kwargs, leaves = gpudiff_inputs(sample, device, requires_grad=entry.grad and backward)
    outs = flat(entry.op(gpudiff, *args, **kwargs))
    grads = []
    if entry.grad and backward:
        diff = [o for o in outs if o.requires_grad]
        if diff:
            seeds = upstream(diff, zlib.crc32(sample.name.encode()))
            gpudiff.autograd.backward(diff, [gpudiff.tensor(g, device=device) for g in seeds])
        grads = [None if t.grad is None else host(t.grad) for t in leaves]
    return [host(o) for o in outs], grads


# ---- forward / backward vs PyTorch ------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,i", _cases())
def test_forward_backward_vs_torch(name, dtype, i, device):
    entry, sample = _sample(name, dtype, i)
    if entry.needs_cuda and not gpudiff.cuda.is_available():
        pytest.skip("needs a cuda device")
    rtol, atol = entry.tolerance(dtype)
    args, kwargs, leaves = gpudiff_inputs(sample, device, requires_grad=entry.grad)
    before = [host(t).copy() for t in flat(args) if isinstance(t, gpudiff.Tensor)]
    outs = flat(entry.op(gpudiff, *args, **kwargs))

    targs, tkwargs, tleaves = torch_inputs(sample, requires_grad=entry.grad)
    touts = flat(entry.torch_op()(torch, *targs, **tkwargs))
    assert len(outs) == len(touts), f"{len(outs)} outputs, torch gives {len(touts)}"
    for k, (o, to) in enumerate(zip(outs, touts)):
        assert isinstance(o, gpudiff.Tensor), f"output {k} is a {type(o).__name__}"
        assert o.device == gpudiff.device(device), f"output {k} on {o.device}"
        assert str(o.dtype) == str(to.dtype).replace("torch.", ""), \
            f"output {k}: dtype {o.dtype}, torch gives {to.dtype}"
        assert o.requires_grad == to.requires_grad, \
            f"output {k}: requires_grad {o.requires_grad}, torch says {to.requires_grad}"
        assert_close(o, to, rtol, atol, f"{name} forward output {k}")
    after = [host(t) for t in flat(args) if isinstance(t, gpudiff.Tensor)]
    for k, (b, a) in enumerate(zip(before, after)):
        np.testing.assert_array_equal(a, b, err_msg=f"input {k} was modified by the op")

    if not entry.grad or "backward" in sample.skip:
        return
    pairs = [(o, to) for o, to in zip(outs, touts) if to.requires_grad]
    if not pairs:
        return
    seeds = upstream([to for _, to in pairs], zlib.crc32(sample.name.encode()))
    gpudiff.autograd.backward([o for o, _ in pairs],
                              [gpudiff.tensor(g, device=device) for g in seeds])
    torch.autograd.backward([to for _, to in pairs], [_torch_from(g) for g in seeds])
    for k, (lf, tl) in enumerate(zip(leaves, tleaves)):
        expected = tl.grad if tl.grad is not None else torch.zeros_like(tl)
        if lf.grad is None:
            assert not expected.detach().abs().sum(), f"input {k}: no gradient, torch has one"
            continue
        assert lf.grad.device == lf.device and lf.grad.dtype == lf.dtype
        assert_close(lf.grad, expected, rtol, atol, f"{name} gradient of input {k}")


# ---- finite differences -----------------------------------------------------------------
def _rebuilt(entry, args, kwargs, leaves):
    """``f(*leaves)`` calling the op with the given leaves put in place of the originals."""
    where = {id(t): k for k, t in enumerate(leaves)}

    def f(*new):
        def put(a):
            return new[where[id(a)]] if id(a) in where else a
        outs = flat(entry.op(gpudiff, *_map(put, args), **_map(put, kwargs)))
        return tuple(o for o in outs if _is_float(o.dtype))
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,i", _cases(lambda e: e.grad and e.gradcheck, (float64,)))
def test_gradcheck(name, dtype, i, device):
    entry, sample = _sample(name, dtype, i)
    if "gradcheck" in sample.skip:
        pytest.skip("gradcheck does not hold at this sample (documented in the entry)")
    if entry.needs_cuda and not gpudiff.cuda.is_available():
        pytest.skip("needs a cuda device")
    args, kwargs, leaves = gpudiff_inputs(sample, device)
    if not leaves:
        pytest.skip("no differentiable input")
    assert gradcheck(_rebuilt(entry, args, kwargs, leaves), tuple(leaves), eps=1e-6,
                     atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name,dtype,i",
                         _cases(lambda e: e.grad and e.gradgradcheck, (float64,)))
def test_gradgradcheck(name, dtype, i):
    entry, sample = _sample(name, dtype, i)
    if {"gradcheck", "gradgradcheck"} & set(sample.skip):
        pytest.skip("gradgradcheck does not hold at this sample (documented in the entry)")
    if entry.needs_cuda and not gpudiff.cuda.is_available():
        pytest.skip("needs a cuda device")
    args, kwargs, leaves = gpudiff_inputs(sample, "cpu")
    if not leaves:
        pytest.skip("no differentiable input")
    assert gradgradcheck(_rebuilt(entry, args, kwargs, leaves), tuple(leaves), eps=1e-6,
                         atol=1e-5, rtol=1e-3)


def _has_array_backward(entry):
    from gpudiff.ops import REGISTRY
    return entry.grad and any(getattr(REGISTRY.get(c), "backward_arrays", None) is not None
                              for c in entry.covers)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,i", _cases(_has_array_backward, (float64,)))
def test_array_backward_equals_tensor_backward(name, dtype, i, device):
    """A plain backward runs ops' ``backward_arrays`` on raw arrays; create_graph=True runs
    the Tensor ``backward`` formulas: both give the same gradients."""
    entry, sample = _sample(name, dtype, i)
    if "backward" in sample.skip or (entry.needs_cuda and not gpudiff.cuda.is_available()):
        pytest.skip("no backward at this sample")
    args, kwargs, leaves = gpudiff_inputs(sample, device)
    outs = [o for o in flat(entry.op(gpudiff, *args, **kwargs))
            if isinstance(o, gpudiff.Tensor) and o.requires_grad]
    if not outs or not leaves:
        pytest.skip("no differentiable output")
    seeds = [gpudiff.tensor(g, device=device)
             for g in upstream(outs, zlib.crc32(sample.name.encode()))]
    plain = gpudiff.autograd.grad(outs, leaves, seeds, retain_graph=True, allow_unused=True)
    graph = gpudiff.autograd.grad(outs, leaves, seeds, create_graph=True, allow_unused=True)
    for k, (a, b) in enumerate(zip(plain, graph)):
        assert (a is None) == (b is None), f"input {k}: a gradient on one path only"
        if a is not None:
            np.testing.assert_allclose(host(a), host(b.detach()), rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name}: gradient of input {k}")


# ---- fast kernels vs reference; CPU vs CUDA -------------------------------------------------
def _compare_runs(r1, r2, dtype, what):
    rtol, atol = SAME_MATH_TOL.get(np.dtype(dtype), (0, 0))
    (o1, g1), (o2, g2) = r1, r2
    assert len(o1) == len(o2) and len(g1) == len(g2)
    for k, (a, b) in enumerate(zip(o1, o2)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == BF16:
            a, b = a.astype(np.float32), b.astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=f"{what}: output {k}")
    for k, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), f"{what}: gradient {k} missing on one side"
        if a is not None:
            if a.dtype == BF16:
                a, b = a.astype(np.float32), b.astype(np.float32)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"{what}: gradient of input {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,i", _cases(lambda e: bool(e.kernels)))
def test_kernel_vs_reference(name, dtype, i, device):
    entry, sample = _sample(name, dtype, i)
    active = [k for k in entry.kernels if runtime.kernel(gpudiff.device(device), k)]
    if not active:
        pytest.skip(f"no fast kernel among {entry.kernels} on {device}")
    fast = run_gpudiff(entry, sample, device)
    with runtime.use_kernels(False):
        assert runtime.kernel(gpudiff.device(device), active[0]) is None
        ref = run_gpudiff(entry, sample, device)
    _compare_runs(fast, ref, dtype, f"{name} with kernels {active} vs reference on {device}")


@pytest.mark.parametrize("name,dtype,i", _cases())
def test_cpu_vs_cuda(name, dtype, i):
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda device (set GPUDIFF_CUDA=emulate)")
    entry, sample = _sample(name, dtype, i)
    _compare_runs(run_gpudiff(entry, sample, "cpu"), run_gpudiff(entry, sample, "cuda"),
                  dtype, f"{name} cpu vs cuda")


# ---- coverage -----------------------------------------------------------------------------
def test_every_registered_op_has_an_entry():
    covered = {n for e in OPS for n in e.covers}
    unknown = covered - set(gpudiff.ops.REGISTRY)
    assert not unknown, f"entries claim to cover ops that are not registered: {sorted(unknown)}"
    missing = set(gpudiff.ops.REGISTRY) - covered - NOT_YET_COVERED
    assert not missing, (f"registered ops without an op-database entry: {sorted(missing)} "
                         f"(add entries to tests/opdb/)")
    stale = NOT_YET_COVERED & covered
    assert not stale, f"remove {sorted(stale)} from opdb.NOT_YET_COVERED: they have entries now"
    for n in NOT_YET_COVERED & set(gpudiff.ops.REGISTRY):  # the allow-list is for CNN ops only
        mod = gpudiff.ops.REGISTRY[n].__module__
        assert mod.rsplit(".", 1)[-1] in ("conv", "pool", "norm"), f"{n} ({mod}) needs an entry"


@pytest.mark.parametrize("name", [e.name for e in OPS if e.covers])
def test_entry_runs_the_ops_it_covers(name, monkeypatch):
    """The ops an entry claims are really applied by its forward, backward or double
    backward (so the coverage test above cannot be satisfied by a wrong claim)."""
    entry = BY_NAME[name]
    if entry.needs_cuda and not gpudiff.cuda.is_available():
        pytest.skip("needs a cuda device")
    seen = set()
    real_apply = gpudiff.ops.apply

    def recording_apply(op, tensors, params):
        seen.add(op.name)
        return real_apply(op, tensors, params)

    monkeypatch.setattr(gpudiff.ops, "apply", recording_apply)
    for dt in entry.dtypes:
        for sample in entry.make_samples(dt):
            args, kwargs, leaves = gpudiff_inputs(sample, "cpu", requires_grad=entry.grad)
            outs = [o for o in flat(entry.op(gpudiff, *args, **kwargs)) if o.requires_grad]
            if not (outs and leaves):
                continue
            # upstream gradients that require grad, as gradgradcheck uses them
            ups = [gpudiff.ones_like(o).requires_grad_() for o in outs]
            gs = gpudiff.autograd.grad(outs, leaves, ups, create_graph=True, allow_unused=True)
            gs = [g for g in gs if g is not None and g.requires_grad]
            if entry.gradgradcheck and gs:
                gpudiff.autograd.grad([g.sum() for g in gs], leaves + ups, allow_unused=True)
    missing = set(entry.covers) - seen
    assert not missing, f"{name} claims to cover {sorted(missing)} but never applies them"
