"""Memory-traffic tracing of emulated kernel launches (a model, not a measurement).

The emulator (csrc/cuda_host/trace.cpp) can record every global-memory access of a kernel:
the lanes of a warp at one access site form a request, whose distinct 32-byte sectors are
the memory transactions a GPU would issue. ``traced_launch`` runs one launch under the
tracer and returns what it saw:

  requests, sectors         warp-wide requests and the sectors they touched
  sectors_per_request       Nsight Compute's "sectors per request" (4 = a float per lane,
                            coalesced; 32 = every lane in its own sector)
  sector_efficiency         bytes the lanes asked for / bytes of the sectors moved
                            (capped per request at 100%: a broadcast is not a waste)
  traffic_bytes             sectors * 32: what the SMs move through L1/L2
  unique_bytes[arg]         distinct sectors * 32 touched in each array argument (-1: the
                            tensors a kernel reached through a pointer table)

Only on the emulated device (NumPy arrays). No caches and no timing are modelled.
"""
import ctypes
import functools
import importlib

from . import launch


@functools.lru_cache(maxsize=None)
def _lib():
    host = importlib.import_module("gpudiff._cuda_host")
    lib = ctypes.CDLL(host.__file__)  # the already-loaded extension: same globals
    lib.gd_trace_start.restype = None
    lib.gd_trace_stop.restype = None
    lib.gd_trace_stop.argtypes = [ctypes.POINTER(ctypes.c_double)]
    lib.gd_trace_unique_sectors.restype = ctypes.c_double
    lib.gd_trace_unique_sectors.argtypes = [ctypes.c_int]
    return lib


def available():
    try:
        _lib()
        return True
    except (ImportError, OSError, AttributeError):
        return False


def traced_launch(source_file, name, grid, block, args, shared_mem=0):
    """Launch like launch.launch (emulator only) and return the trace summary (dict)."""
    lib = _lib()
    lib.gd_trace_start()
    out = (ctypes.c_double * 5)()
    try:
        launch.launch(source_file, name, grid, block, args, shared_mem)
    finally:
        lib.gd_trace_stop(out)
    accesses, requests, sectors, requested, useful = list(out)
    n_arrays = len(args)
    unique = {i: 32 * lib.gd_trace_unique_sectors(i) for i in list(range(n_arrays)) + [-1]}
    return {
        "kernel": name,
        "accesses": int(accesses),
        "requests": int(requests),
        "sectors": int(sectors),
        "requested_bytes": requested,
        "useful_bytes": useful,
        "traffic_bytes": 32.0 * sectors,
        "sectors_per_request": sectors / requests if requests else 0.0,
        "sector_efficiency": useful / (32.0 * sectors) if sectors else 1.0,
        "unique_bytes": {k: v for k, v in unique.items() if v},
    }
