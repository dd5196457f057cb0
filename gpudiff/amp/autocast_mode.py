"""``gpudiff.autocast``: mixed precision by casting op inputs at dispatch (PyTorch's autocast).

The policy (which op runs in which dtype, per device type) and the cast live in
gpudiff/runtime/autocast.py, consulted by ``ops.apply``; this is the context manager.
"""
import functools

from ..runtime import autocast as _state


class autocast:
    """Run the ops of a region in mixed precision (a context manager and a decorator).

    ``device_type`` is 'cuda' (default dtype float16) or 'cpu' (default bfloat16);
    convolutions, linear layers and matrix products run in ``dtype``, numerically sensitive
    ops (softmax, sums, losses, ... on CUDA; the losses on the CPU) in float32, the rest in
    their inputs' dtype. Regions nest; ``enabled=False`` turns autocast off inside one.

    >>> with gpudiff.autocast("cpu"):
    ...     y = model(x)            # conv / linear outputs are bfloat16
    ...     loss = F.cross_entropy(y, t)   # float32
    """

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=True):
        if not isinstance(device_type, str):
            raise TypeError(f"autocast: expected device_type as a string ('cuda' or 'cpu'), "
                            f"got {type(device_type).__name__}")
        self.device = device_type
        self.enabled = bool(enabled)
        self.cache_enabled = bool(cache_enabled)
        if self.enabled:
            self.device, self.fast_dtype = _state.check(device_type, dtype)
        else:
            self.fast_dtype = dtype
        self._depth = 0

    def __enter__(self):
        _state.enter(self.device, self.fast_dtype, self.enabled, self.cache_enabled)
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        _state.exit_()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with autocast(self.device, self.fast_dtype, self.enabled, self.cache_enabled):
                return fn(*args, **kwargs)
        return wrapper

    def __repr__(self):
        return (f"autocast(device_type={self.device!r}, dtype={self.fast_dtype}, "
                f"enabled={self.enabled})")


def is_autocast_enabled(device_type="cuda"):
    """Whether an autocast region is active for ``device_type``."""
    return _state.get(device_type) is not None


def get_autocast_dtype(device_type):
    """The low dtype of the active region of ``device_type`` (its default when none is)."""
    r = _state.get(device_type)
    if r is not None:
        return r.dtype
    return _state.check(device_type, None)[1]


class _DeviceAutocast(autocast):
    """``gpudiff.cuda.amp.autocast`` / ``gpudiff.cpu.amp.autocast``: the device fixed."""

    _device = None

    def __init__(self, enabled=True, dtype=None, cache_enabled=True):
        super().__init__(self._device, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


class cuda_autocast(_DeviceAutocast):
    _device = "cuda"


class cpu_autocast(_DeviceAutocast):
    _device = "cpu"
