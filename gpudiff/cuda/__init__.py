"""gpudiff.cuda: is_available(), device_count(), synchronize(), memory stats.

With GPUDIFF_CUDA=emulate the 'cuda' device is the CPU emulator of our CUDA kernels: it says
"emulated" wherever it reports itself and never counts as a GPU result.
"""
from .. import runtime


def is_available():
    return runtime.cuda_mode() is not None


def is_emulated():
    return runtime.cuda_mode() == "emulate"


def device_count():
    return runtime.cuda_device_count()


def current_device():
    return 0


def get_device_name(device=None):
    mode = runtime.cuda_mode()
    if mode is None:
        raise RuntimeError("get_device_name: CUDA is not available")
    if mode == "emulate":
        return "gpudiff CUDA emulator (emulated, CPU)"
    idx = 0 if device is None else runtime.device(device if not isinstance(device, int)
                                                  else f"cuda:{device}").index
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(idx)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else name


def synchronize(device=None):
    if runtime.cuda_mode() == "gpu":
        import cupy
        cupy.cuda.Device().synchronize()


def _pool():
    """CuPy's default memory pool on a GPU, the emulated device's pool (runtime/emulated.py,
    which accounts the same way) under GPUDIFF_CUDA=emulate, None without CUDA."""
    mode = runtime.cuda_mode()
    if mode == "gpu":
        import cupy
        return cupy.get_default_memory_pool()
    if mode == "emulate":
        return runtime.emulated.pool
    return None


_peak = [0]  # on a GPU: the most memory_allocated() has seen (CuPy's pool keeps no peak)


def memory_allocated(device=None):
    """Bytes of live device arrays (each rounded up to 512 bytes, as CuPy's pool does)."""
    p = _pool()
    if p is None:
        return 0
    used = p.used_bytes()
    _peak[0] = max(_peak[0], used)
    return used


def max_memory_allocated(device=None):
    """The most memory_allocated since the start or reset_peak_memory_stats(); exact on the
    emulated device, on a GPU the most that a memory_allocated() call saw."""
    p = _pool()
    if p is None:
        return 0
    if p is runtime.emulated.pool:
        return p.max_used_bytes()
    return max(_peak[0], p.used_bytes())


def reset_peak_memory_stats(device=None):
    p = _pool()
    if p is runtime.emulated.pool:
        p.reset_peak()
    _peak[0] = memory_allocated()


def memory_reserved(device=None):
    """memory_allocated plus the freed blocks the pool keeps for reuse (until empty_cache)."""
    p = _pool()
    return 0 if p is None else p.total_bytes()


def empty_cache():
    """Give the pool's cached blocks back: memory_reserved drops to memory_allocated."""
    p = _pool()
    if p is not None:
        p.free_all_blocks()


def manual_seed(seed):
    runtime.manual_seed(seed)


def manual_seed_all(seed):
    runtime.manual_seed(seed)


# ---- CUDA graphs and streams (gpudiff/cuda/graphs.py) -------------------------------------
from .graphs import (CUDAGraph, Event, Stream, current_stream, default_stream,  # noqa: E402
                     graph, graph_pool_handle, is_current_stream_capturing,
                     make_graphed_callables, stream)
from . import amp  # noqa: E402,F401  (gpudiff.cuda.amp.autocast / GradScaler)
