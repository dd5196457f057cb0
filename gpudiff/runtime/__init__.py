"""The only package that knows numpy from cupy.

A Device says where a tensor's array lives and which array module (``xp``) computes on it:

  device('cpu')                    numpy arrays, our C++ kernels (gpudiff._C) where built
  device('cuda:N')  (real GPU)     cupy arrays, our .cu kernels compiled by NVRTC
  device('cuda:N')  (emulated)     numpy arrays, our .cu kernels run by the CPU emulator
                                   (GPUDIFF_CUDA=emulate): the whole CUDA code path in CI

Everything above this package asks ``device.xp`` and ``kernel(device, name)``; no
``if cupy`` anywhere else.
"""
import contextlib
import os

import numpy as np

from .kernels import KERNELS, active_kernels, kernel, register_kernel, use_kernels  # noqa: F401
from .dtypes import LOW_FLOATS, bfloat16, is_floating, is_low  # noqa: F401

# ---- the optional pieces --------------------------------------------------------------
try:  # C++ CPU kernels
    from gpudiff import _C  # noqa: F401
except ImportError:  # the NumPy reference path still works
    _C = None

_EMULATE = os.environ.get("GPUDIFF_CUDA", "").lower() == "emulate"
_cupy = None
if not _EMULATE and os.environ.get("GPUDIFF_CUDA", "").lower() != "off":
    try:
        import cupy as _cupy  # noqa: F401
        if _cupy.cuda.runtime.getDeviceCount() < 1:
            _cupy = None
    except Exception:  # no cupy, no driver, no device: CPU only
        _cupy = None
from . import emulated  # the emulated device's array module and memory pool


def cuda_mode():
    """'gpu' (CuPy on a real GPU), 'emulate' (GPUDIFF_CUDA=emulate) or None."""
    if _EMULATE:
        return "emulate"
    return "gpu" if _cupy is not None else None


def cuda_device_count():
    if _EMULATE:
        return 1
    return _cupy.cuda.runtime.getDeviceCount() if _cupy is not None else 0


# ---- devices --------------------------------------------------------------------------
class Device:
    """Where a tensor lives: ``Device('cpu')``, ``Device('cuda', 0)``.

    >>> Device('cpu')
    device(type='cpu')
    """

    __slots__ = ("type", "index")

    def __init__(self, type, index=None):
        self.type = type
        self.index = index

    @property
    def emulated(self):
        return self.type == "cuda" and _EMULATE

    @property
    def host(self):
        """Whether this device's arrays are NumPy arrays: the CPU, or the emulated CUDA device."""
        return self.type == "cpu" or _EMULATE

    @property
    def xp(self):
        """The array module that computes on this device (emulated cuda: NumPy allocating
        from the emulated device's pool, runtime/emulated.py)."""
        if self.type == "cuda":
            return emulated.xp if _EMULATE else _cupy
        return np

    def __eq__(self, other):
        if isinstance(other, str):
            other = device(other)
        return isinstance(other, Device) and (self.type, self.index or 0) == (
            other.type, other.index or 0)

    def __hash__(self):
        return hash((self.type, self.index or 0))

    def __repr__(self):
        idx = "" if self.index is None else f", index={self.index}"
        emu = ", emulated" if self.emulated else ""
        return f"device(type='{self.type}'{idx}{emu})"

    def __str__(self):
        s = self.type if self.index is None else f"{self.type}:{self.index}"
        return s + (" (emulated)" if self.emulated else "")

    def __enter__(self):
        """``with gpudiff.device('cuda'):`` makes this the factories' default for the block."""
        _default_stack.append(self)
        return self

    def __exit__(self, *exc):
        _default_stack.pop()
        return False


CPU = Device("cpu")
_default_stack = [CPU]  # [set_default_device's, then one per enclosing `with device(...)`]


def default_device():
    """Where factories put a tensor when no device is given (PyTorch 2's default device)."""
    return _default_stack[-1]


def set_default_device(dev):
    """Make ``dev`` ('cpu', 'cuda', a Device; None for cpu) the factories' default device."""
    _default_stack[0] = CPU if dev is None else device(dev)


def get_default_device():
    return _default_stack[-1]


def device(spec="cpu", index=None):
    """Parse 'cpu', 'cuda', 'cuda:1' or a Device into a Device.

    Asking for 'cuda' when there is none raises a clear RuntimeError.
    """
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"device: expected a string like 'cpu' or 'cuda:0', got {spec!r}")
    typ, _, idx = spec.partition(":")
    if typ not in ("cpu", "cuda"):
        raise RuntimeError(f"device: unknown device type {typ!r} (expected 'cpu' or 'cuda')")
    if idx:
        index = int(idx)
    if typ == "cpu":
        return CPU
    if cuda_mode() is None:
        raise RuntimeError(
            "device: CUDA was asked for but is not available (no CuPy or no GPU); "
            "install gpudiff[cuda] on a machine with an NVIDIA GPU, or set GPUDIFF_CUDA=emulate "
            "to run the CUDA code path on the CPU emulator")
    index = 0 if index is None else index
    if index >= cuda_device_count():
        raise RuntimeError(f"device: cuda:{index} does not exist "
                           f"({cuda_device_count()} device(s))")
    return Device("cuda", index)


def device_of_array(a):
    """The natural device of a raw array (numpy -> cpu, cupy -> its GPU)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return Device("cuda", a.device.id)
    return CPU


def is_array(a):
    return isinstance(a, np.ndarray) or (_cupy is not None and isinstance(a, _cupy.ndarray))


def to_device(a, dev):
    """Copy (or pass through) a raw array to ``dev``'s array module."""
    if dev.type == "cuda":
        if _EMULATE:  # a copy in the emulated device's memory, as on a GPU
            return emulated.to_device(a)
        with _cupy.cuda.Device(dev.index or 0):
            return _cupy.asarray(a)
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_numpy(a):
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return a


_NO_GUARD = contextlib.nullcontext()  # stateless: one instance serves every CPU op


def on_device(dev):
    """Context manager making ``dev`` current for allocations (a no-op off real GPUs)."""
    if dev.type == "cuda" and not _EMULATE:
        return _cupy.cuda.Device(dev.index or 0)
    return _NO_GUARD


# ---- random numbers -------------------------------------------------------------------
class Generator:
    """A seeded source of random numbers, like torch.Generator.

    Draws happen on the host (numpy's PCG64) and are moved to the device, so a seed gives the
    same numbers on CPU, emulated CUDA and a real GPU.
    """

    def __init__(self, device="cpu"):
        self.device = device
        self._rng = np.random.default_rng()
        self._seed = None

    def manual_seed(self, seed):
        self._seed = int(seed)
        self._rng = np.random.default_rng(self._seed)
        return self

    def initial_seed(self):
        return self._seed

    def get_state(self):
        return self._rng.bit_generator.state

    def set_state(self, state):
        self._rng.bit_generator.state = state

    @property
    def rng(self):
        return self._rng


default_generator = Generator()


def manual_seed(seed):
    """Seed every generator gpudiff uses (CPU and GPU draws alike)."""
    default_generator.manual_seed(seed)
    return default_generator


def rng(generator=None):
    return (generator or default_generator).rng


def report():
    """What is active: which compiled kernels and which CUDA mode."""
    return {
        "cpu_extension": _C is not None,
        "cuda": cuda_mode(),
        "kernels": active_kernels(),
    }


# the kernel modules register themselves into KERNELS on import
if _C is not None:
    from . import cpu_kernels  # noqa: E402,F401  (C++ kernels)
if cuda_mode() is not None:
    from . import cuda  # noqa: E402,F401  (csrc/cuda kernels: a GPU or the emulator)


def index_add_at(out, key, values):
    """out[key] += values, unbuffered: repeated indices accumulate (np.add.at)."""
    if isinstance(out, np.ndarray):
        np.add.at(out, key, values)
    else:
        import cupyx
        cupyx.scatter_add(out, key, values)


def erf(a):
    """The error function on any device (no scipy needed on the CPU)."""
    if isinstance(a, np.ndarray):
        if _C is not None and hasattr(_C, "erf"):
            return _C.erf(a)
        import math
        return np.vectorize(math.erf, otypes=[a.dtype])(a)
    import cupyx.scipy.special
    return cupyx.scipy.special.erf(a)
