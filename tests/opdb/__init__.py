"""The op database: one entry per op drives the generic tests of tests/test_ops.py.

An entry is an :class:`OpInfo`. Adding an op to gpudiff means adding an entry here (in the
module of its family: ``core.py`` for the tensor ops, ``losses.py`` for activations and
losses, ``cnn.py`` for conv / pooling / normalisation); the generic tests then check it
against PyTorch, by finite differences, kernel against reference and CPU against CUDA.

Entry format::

    OpInfo(
        "exp",                              # unique name (test ids)
        op=lambda m, x: m.exp(x),           # the call, with m = the gpudiff or torch module
        samples=unary_samples,              # samples(make) -> list[Sample] (see below)
        covers=("exp",),                    # the registered primitives (gpudiff.ops.REGISTRY)
                                            #   this entry exercises (forward or backward)
        ref=None,                           # the torch call when it differs from ``op``
        dtypes=(float64, float32),          # dtypes of the generated floating inputs
        tol={float32: (1e-4, 1e-5)},        # {dtype: (rtol, atol)} overrides vs PyTorch
        grad=True,                          # differentiable: backward is compared to torch
        gradcheck=True,                     # float64 finite-difference check
        gradgradcheck=False,                # double-backward finite-difference check
        kernels=(),                         # fast-kernel names the op may use
        domain=(-2.0, 2.0),                 # range of random floating inputs
        needs_cuda=False,                   # only meaningful with a cuda device (to_device)
    )

``m`` is ``gpudiff`` or ``torch``; functional ops are spelled ``m.nn.functional.relu``
(this package imports ``gpudiff.nn.functional`` so that attribute exists).

Samples. ``samples(make)`` returns a list of :class:`Sample` (``S(*args, name=..., **kw)``).
``make`` (a :class:`Maker`) creates NumPy arrays of the dtype under test::

    make(3, 4)                      # random floats in the entry's domain, shape (3, 4)
    make()                          # a 0-d array
    make(3, 4, noncontig=True)      # a non-contiguous view (strided) of that shape
    make(3, 4, low=0.5, high=2)     # another range
    make(3, 4, avoid=(0,))          # keep values >= 0.05 away from kinks
    make(3, 4, distinct=True)       # values pairwise >= 0.02 apart (no ties for max/min)
    make.index((5,), high=3)        # int64 indices in [0, 3) (repeats likely)
    make.mask(3, 4)                 # a random bool array
    Const(make(3, 4))               # a floating input that is not differentiated (targets)

Arguments may nest (lists for cat/stack, tuples for index keys): every floating array
anywhere is a differentiable input unless wrapped in ``Const``; integer and bool arrays are
plain (index) tensors; anything else (ints, slices, dtypes) is passed as is. Samples are
regenerated for every test from a seed derived from the entry's name, so a generator must
return the same number of samples for every dtype. A sample can opt out of checks that do
not hold at it: ``S(..., skip=("gradcheck", "gradgradcheck", "backward", "float32"))``.
"""
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

import gpudiff
import gpudiff.nn.functional

float16, float32, float64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")
bfloat16 = gpudiff.bfloat16   # ml_dtypes' (kind 'V'): floating for gpudiff and for the tests
LOW = (float16, bfloat16)     # compared with PyTorch's own float16 / bfloat16 CPU ops
int32, int64, bool_ = np.dtype("int32"), np.dtype("int64"), np.dtype("bool")

# default (rtol, atol) against PyTorch: tight in float64, loose in float32
TOL = {float64: (1e-7, 1e-9), float32: (1e-4, 2e-5), float16: (1e-2, 1e-2),
       bfloat16: (3e-2, 3e-2)}


class Const:
    """A floating input that is not differentiated (a target, a class weight)."""

    def __init__(self, array):
        self.array = array

    def __repr__(self):
        return f"Const({_describe(self.array)})"


@dataclass
class Sample:
    args: tuple
    kwargs: dict
    name: str
    skip: tuple = ()


def S(*args, name=None, skip=(), **kwargs):
    """A sample: the positional args and keyword args of one call of ``op``."""
    if name is None:
        parts = [_describe(a) for a in args]
        parts += [f"{k}={_describe(v)}" for k, v in kwargs.items()]
        name = ",".join(parts)
    return Sample(tuple(args), dict(kwargs), name, tuple(skip))


def _describe(a):
    if isinstance(a, Const):
        return "c" + _describe(a.array)
    if isinstance(a, np.ndarray):
        s = "x".join(map(str, a.shape)) or "0d"
        if a.dtype.kind == "b":
            s = "mask" + s
        elif a.dtype.kind in "iu":
            s = "idx" + s
        if a.ndim >= 1 and not a.flags.c_contiguous:
            s += "nc"
        return s
    if isinstance(a, (tuple, list)):
        return "(" + ";".join(_describe(x) for x in a) + ")"
    if isinstance(a, slice):
        return f"{'' if a.start is None else a.start}:{'' if a.stop is None else a.stop}"
    if a is Ellipsis:
        return "..."
    return str(a)


@dataclass
class OpInfo:
    name: str
    op: callable
    samples: callable
    covers: tuple = ()
    ref: callable = None
    dtypes: tuple = (float64, float32)
    tol: dict = field(default_factory=dict)
    grad: bool = True
    gradcheck: bool = True
    gradgradcheck: bool = False
    kernels: tuple = ()
    domain: tuple = (-2.0, 2.0)
    needs_cuda: bool = False

    def tolerance(self, dtype):
        """(rtol, atol) vs PyTorch; integer/bool inputs: float32's (for float outputs)."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f" and dtype != bfloat16:
            dtype = float32
        return self.tol.get(dtype, TOL[dtype])

    def torch_op(self):
        return self.ref or self.op

    def make_samples(self, dtype):
        """The samples for ``dtype`` (deterministic: seeded by the entry's name)."""
        seed = zlib.crc32(self.name.encode())
        return self.samples(Maker(dtype, seed, self.domain))


class Maker:
    """Creates the sample arrays of one entry for one dtype (see the module docstring)."""

    def __init__(self, dtype, seed, domain):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.domain = domain

    def __call__(self, *shape, low=None, high=None, dtype=None, noncontig=False, avoid=(),
                 distinct=False):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        dt = np.dtype(dtype) if dtype is not None else self.dtype
        lo = self.domain[0] if low is None else low
        hi = self.domain[1] if high is None else high
        n = int(np.prod(shape))
        if dt.kind == "b":
            a = self.rng.random(n) < 0.5
        elif dt.kind in "iu":
            a = self.rng.integers(int(lo) if low is not None else -5,
                                  int(hi) if high is not None else 6, n)
        elif distinct and dt in LOW:  # a coarser grid: distinct after rounding too
            grid = np.linspace(lo, hi, 2 * n + 1)[1::2]
            a = self.rng.permutation(grid)
        elif distinct:  # a shuffled grid: every pair at least (hi - lo) / (2n) apart
            grid = np.linspace(lo, hi, 2 * n + 1)[1::2]
            a = self.rng.permutation(grid)
        else:
            a = self.rng.uniform(lo, hi, n)
            for p in avoid:  # push values off kinks (finite differences must not cross them)
                near = np.abs(a - p) < 0.05
                a[near] = p + np.where(a[near] >= p, 0.1, -0.1)
        a = a.astype(dt).reshape(shape)
        if noncontig and a.ndim >= 2:
            # the same values in a transposed buffer: C-non-contiguous, positive strides
            a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        elif noncontig and a.ndim == 1:
            b = np.zeros(2 * a.shape[0], dt)
            b[::2] = a
            a = b[::2]
        return a

    def index(self, shape, high, low=0):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.rng.integers(low, high, shape).astype(np.int64)

    def mask(self, *shape):
        return self.rng.random(shape) < 0.5


# ---- the database ------------------------------------------------------------------------
def _collect():
    import importlib
    entries = []
    for mod in ("core", "losses", "cnn"):
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # cnn.py arrives with the CNN ops
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        entries += m.OPS
    names = [e.name for e in entries]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"op database: duplicate entry names {sorted(dup)}")
    return entries


OPS = _collect()

# Registered ops that have no entry yet, allowed so that the coverage test passes while
# their owner writes tests/opdb/cnn.py (issue 3). Remove each name when its entry lands;
# nothing outside the CNN ops may be listed here.
NOT_YET_COVERED = set()


# ---- devices ------------------------------------------------------------------------------
def device_params():
    """'cpu' and 'cuda' as pytest params: 'cuda' is the emulated device in CI (always runs),
    a real GPU (marked ``gpu``) with GPUDIFF_TEST_REAL_GPU=1, skipped when neither."""
    real = gpudiff.cuda.is_available() and not gpudiff.cuda.is_emulated()
    marks = [pytest.mark.skipif(not gpudiff.cuda.is_available(), reason="no cuda device")]
    if real:
        marks.append(pytest.mark.gpu)
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=marks)]
