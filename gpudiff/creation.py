"""Factories: tensor, zeros, ones, arange, randn, ... (PyTorch's names and defaults)."""
import numpy as np

from . import runtime
from .runtime import capture
from .tensor import Tensor, _infer_dtype, _to_array, get_default_dtype


def _dtype(dtype):
    return None if dtype is None else np.dtype(dtype)


def _device(device):
    return runtime.default_device() if device is None else runtime.device(device)


def _new(array, dev, requires_grad):
    t = Tensor._make(array, dev)
    if requires_grad:
        t.requires_grad = True
    return t


def tensor(data, dtype=None, device=None, requires_grad=False):
    """A new tensor holding a copy of ``data``.

    >>> gpudiff.tensor([[1, 2], [3, 4]]).dtype
    dtype('int64')
    """
    dev = _device(device)
    return _new(_to_array(data, dtype, dev), dev, requires_grad)


def as_tensor(data, dtype=None, device=None):
    if isinstance(data, Tensor):
        out = data
        if dtype is not None or device is not None:
            out = data.to(*(a for a in (device, dtype) if a is not None))
        return out
    dev = _device(device)
    if isinstance(data, np.ndarray) and dev.type == "cpu" and (dtype is None or
                                                               np.dtype(dtype) == data.dtype):
        return Tensor._make(data, dev)
    return tensor(data, dtype, device)


def from_numpy(a):
    """A CPU tensor sharing memory with the ndarray ``a``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"from_numpy: expected np.ndarray (got {type(a).__name__})")
    return Tensor._make(a, runtime.CPU)


def from_dlpack(ext):
    if hasattr(ext, "__dlpack_device__"):
        dev_type, dev_id = ext.__dlpack_device__()
        if int(dev_type) == 2:  # kDLCUDA
            xp = runtime.device(f"cuda:{dev_id}").xp
            return Tensor._make(xp.from_dlpack(ext), runtime.Device("cuda", dev_id))
    return Tensor._make(np.from_dlpack(ext), runtime.CPU)


def _size(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        return tuple(size[0])
    return tuple(int(s) for s in size)


def _filled(fn_name, size, dtype, device, requires_grad, *args):
    dev = _device(device)
    dt = _dtype(dtype) or get_default_dtype()
    with runtime.on_device(dev):
        a = getattr(dev.xp, fn_name)(_size(size), *args, dtype=dt)
    return _new(a, dev, requires_grad)


def zeros(*size, dtype=None, device=None, requires_grad=False):
    return _filled("zeros", size, dtype, device, requires_grad)


def ones(*size, dtype=None, device=None, requires_grad=False):
    return _filled("ones", size, dtype, device, requires_grad)


def empty(*size, dtype=None, device=None, requires_grad=False):
    return _filled("zeros", size, dtype, device, requires_grad)


def full(size, fill_value, dtype=None, device=None, requires_grad=False):
    if dtype is None:
        dtype = _infer_dtype(fill_value)
    return _filled("full", (size,), dtype, device, requires_grad, fill_value)


def _like(t, dtype, device):
    return dtype or t.dtype, device or t.device


def zeros_like(t, dtype=None, device=None, requires_grad=False):
    return zeros(t.shape, dtype=dtype or t.dtype, device=device or t.device,
                 requires_grad=requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad=False):
    return ones(t.shape, dtype=dtype or t.dtype, device=device or t.device,
                requires_grad=requires_grad)


def empty_like(t, dtype=None, device=None, requires_grad=False):
    return zeros_like(t, dtype, device, requires_grad)


def full_like(t, fill_value, dtype=None, device=None, requires_grad=False):
    return full(t.shape, fill_value, dtype=dtype or t.dtype, device=device or t.device,
                requires_grad=requires_grad)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False):
    if end is None:
        start, end = 0, start
    if dtype is None:
        is_int = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = np.int64 if is_int else get_default_dtype()
    dev = _device(device)
    return _new(runtime.to_device(np.arange(start, end, step, dtype=dtype), dev), dev,
                requires_grad)


def linspace(start, end, steps, dtype=None, device=None, requires_grad=False):
    dev = _device(device)
    a = np.linspace(start, end, steps, dtype=_dtype(dtype) or get_default_dtype())
    return _new(runtime.to_device(a, dev), dev, requires_grad)


def eye(n, m=None, dtype=None, device=None, requires_grad=False):
    dev = _device(device)
    a = np.eye(n, m, dtype=_dtype(dtype) or get_default_dtype())
    return _new(runtime.to_device(a, dev), dev, requires_grad)


# ---- random (drawn on the host from gpudiff's generator: same numbers on every device) --
def _random(draw, size, dtype, device, requires_grad, generator):
    dev = _device(device)
    capture.check_alloc("a random factory (rand, randn, ...: numbers drawn on the host)")
    a = draw(runtime.rng(generator), _size(size)).astype(_dtype(dtype) or get_default_dtype())
    return _new(runtime.to_device(a, dev), dev, requires_grad)


def rand(*size, generator=None, dtype=None, device=None, requires_grad=False):
    return _random(lambda r, s: r.random(s), size, dtype, device, requires_grad, generator)


def randn(*size, generator=None, dtype=None, device=None, requires_grad=False):
    return _random(lambda r, s: r.standard_normal(s), size, dtype, device, requires_grad,
                   generator)


def randint(low, high=None, size=None, generator=None, dtype=None, device=None,
            requires_grad=False):
    if high is None or (size is None and isinstance(high, (tuple, list))):
        low, high, size = 0, low, size if high is None else high  # randint(high, size)
    return _random(lambda r, s: r.integers(low, high, s), (size,), dtype or np.int64, device,
                   requires_grad, generator)


def randperm(n, generator=None, dtype=None, device=None):
    dev = _device(device)
    capture.check_alloc("randperm (drawn on the host)")
    a = runtime.rng(generator).permutation(n).astype(_dtype(dtype) or np.int64)
    return _new(runtime.to_device(a, dev), dev, False)


def rand_like(t, dtype=None, device=None, requires_grad=False):
    return rand(t.shape, dtype=dtype or t.dtype, device=device or t.device,
                requires_grad=requires_grad)


def randn_like(t, dtype=None, device=None, requires_grad=False):
    return randn(t.shape, dtype=dtype or t.dtype, device=device or t.device,
                 requires_grad=requires_grad)


def randint_like(t, low, high=None, dtype=None, device=None):
    return randint(low, high, t.shape, dtype=dtype or t.dtype, device=device or t.device)
