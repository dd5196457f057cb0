"""One CUDA kernel launcher, two implementations.

``launch(source_file, name, grid, block, args, shared_mem=0)`` runs kernel ``name`` of
``csrc/cuda/<source_file>``. What runs it depends on the arrays in ``args``:

* CuPy arrays (a real GPU): NVRTC compiles the file once per device through
  ``cupy.RawModule(code=module_source(f), options=NVRTC_OPTIONS,
  name_expressions=name_expressions(f))``, then the kernel is launched on the arrays' device.
* NumPy arrays (the emulated device, ``GPUDIFF_CUDA=emulate``): ``gpudiff._cuda_host``, the
  CPU emulator built by setup.py from the very same .cu files, runs it (docs/EMULATOR.md).

Kernel names are the name expressions each .cu file lists once, in its
``GPUDIFF_KERNEL(softmax_fwd<float>)`` lines: they are CuPy's ``name_expressions`` here and
the emulator's registrations in its build, and tests check both against the file.

Arguments are arrays (C-contiguous, passed as pointers) or typed NumPy scalars
(``np.int32(cols)``, ``np.float32(slope)``): a kernel reads exactly the bytes its parameter
type says, so a Python int or float, whose width would be a guess, is refused.

>>> import numpy as np
>>> x = np.array([-1.0, 2.0], np.float32); y = np.empty_like(x)
>>> launch("activations.cu", "relu_fwd<float>", 1, 32, (x, y, np.int64(2)))  # doctest: +SKIP
>>> y                                                                         # doctest: +SKIP
array([0., 2.], dtype=float32)

Emulator settings (thread order between sync points, block order, seed) come from the
environment variable ``GPUDIFF_EMULATOR``, e.g. ``order=random,seed=3,shuffle_blocks=1``
(and ``check=race,init``: the emulator's racecheck and initcheck, docs/EMULATOR.md),
and can be changed with :func:`set_emulator` or, for a block of code, :func:`emulator`.
"""
import contextlib
import functools
import importlib
import math
import os
import re

import numpy as np

from ...geometry import INT32_MAX
from .. import cuda_mode, events
from .. import emulated as _emulated

# NVRTC options of every kernel module; CuPy adds the architecture (-arch) itself.
NVRTC_OPTIONS = ("--std=c++17",)
# SMs of the emulated device: launch configurations are computed as for an H100.
EMULATED_SM_COUNT = 132

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_SRC = os.path.normpath(os.path.join(_HERE, "..", "..", "..", "csrc", "cuda"))
_PACKAGE_SRC = os.path.normpath(os.path.join(_HERE, "..", "..", "_cuda_src"))
_KERNEL_LINE = re.compile(r"^\s*GPUDIFF_KERNEL\((.*)\)\s*$")
_INCLUDE_LINE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def source_dir():
    """Directory of the .cu files: csrc/cuda in a source checkout, else the package data."""
    if os.path.isfile(os.path.join(_CHECKOUT_SRC, "common.cuh")):
        return _CHECKOUT_SRC
    if os.path.isfile(os.path.join(_PACKAGE_SRC, "common.cuh")):
        return _PACKAGE_SRC
    raise FileNotFoundError(f"CUDA kernel sources not found in {_CHECKOUT_SRC} or {_PACKAGE_SRC}")


def source_files():
    """Names of all kernel files, e.g. ['activations.cu', 'cross_entropy.cu', 'softmax.cu']."""
    return sorted(f for f in os.listdir(source_dir()) if f.endswith(".cu"))


def _read(fname):
    with open(os.path.join(source_dir(), fname), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def name_expressions(source_file):
    """The kernel name expressions listed in ``source_file`` (its GPUDIFF_KERNEL lines)."""
    names = []
    for line in _read(source_file).splitlines():
        m = _KERNEL_LINE.match(line)
        if m:
            # the spelling the C preprocessor's #__VA_ARGS__ gives: single spaces
            names.append(re.sub(r"\s+", " ", m.group(1).strip()))
    if len(set(names)) != len(names):
        raise ValueError(f"{source_file}: a GPUDIFF_KERNEL name is listed twice")
    return tuple(names)


@functools.lru_cache(maxsize=None)
def module_source(source_file):
    """The code handed to NVRTC: ``source_file`` with our includes pasted in.

    Pasting (rather than ``-I``) puts the header text into CuPy's compile-cache key, so an
    edited common.cuh is never served from a stale cache. #line keeps NVRTC's messages
    pointing at the real files.
    """
    out = []
    for i, line in enumerate(_read(source_file).splitlines(), start=1):
        m = _INCLUDE_LINE.match(line)
        if m:
            out.append(f'#line 1 "{m.group(1)}"')
            out.append(_read(m.group(1)))
            out.append(f'#line {i + 1} "{source_file}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# ---- emulator settings --------------------------------------------------------------------
_ORDERS = ("forward", "reverse", "random")
_CHECKS = ("race", "init")  # racecheck, initcheck (docs/EMULATOR.md); bounds checks are always on
_emulator = {"order": "forward", "seed": 0, "shuffle_blocks": False, "check": ()}


def _parse_check(check):
    """'race,init' / ('race', 'init') / '' / 'none' -> a sorted tuple of check names."""
    if isinstance(check, str):
        check = [] if check.strip().lower() in ("", "none", "0") else check.split("+")
    names = tuple(sorted({c.strip() for c in check}))
    for c in names:
        if c not in _CHECKS:
            raise ValueError(f"check must name some of {_CHECKS}, got {c!r}")
    return names


def set_emulator(order=None, seed=None, shuffle_blocks=None, check=None):
    """Set how the emulator schedules: ``order`` of the threads between sync points
    ('forward', 'reverse', 'random'), ``shuffle_blocks`` (random block order), ``seed``;
    and what it checks: ``check``, some of 'race' (racecheck) and 'init' (initcheck), as a
    tuple or a '+'-joined string ('race+init'; '' for none)."""
    if check is not None:
        _emulator["check"] = _parse_check(check)
    if order is not None:
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        _emulator["order"] = order
    if seed is not None:
        _emulator["seed"] = int(seed)
    if shuffle_blocks is not None:
        _emulator["shuffle_blocks"] = bool(shuffle_blocks)


def emulator_settings():
    """The current emulator settings, a dict with keys order, seed, shuffle_blocks, check."""
    return dict(_emulator)


@contextlib.contextmanager
def emulator(order=None, seed=None, shuffle_blocks=None, check=None):
    """``with emulator(order='reverse'): ...`` runs a block of code under other settings."""
    old = dict(_emulator)
    set_emulator(order, seed, shuffle_blocks, check)
    try:
        yield
    finally:
        _emulator.update(old)


def _settings_from_env(text):
    """Parse GPUDIFF_EMULATOR, e.g. 'order=random,seed=3,shuffle_blocks=1,check=race,init'
    (the names after check= may also be joined by '+': 'check=race+init')."""
    kw = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq and key in _CHECKS and "check" in kw:  # check=race,init
            kw["check"] += "+" + key
        elif key == "order":
            kw["order"] = value
        elif key == "seed":
            kw["seed"] = int(value)
        elif key == "shuffle_blocks":
            kw["shuffle_blocks"] = value.lower() in ("1", "true", "yes", "on")
        elif key == "check":
            kw["check"] = value
        else:
            raise ValueError(f"GPUDIFF_EMULATOR: unknown setting {key!r} in {text!r}")
    set_emulator(**kw)


_settings_from_env(os.environ.get("GPUDIFF_EMULATOR", ""))

# what the last emulated launch cost: {'blocks', 'threads', 'resumes'}
last_emulator_stats = {}


# ---- launching ----------------------------------------------------------------------------
def is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """cupy, or for a NumPy array numpy (the emulated device's, allocating from its pool, under
    GPUDIFF_CUDA=emulate), whichever ``a`` belongs to (without importing cupy for numpy)."""
    if is_cupy(a):
        return importlib.import_module("cupy")
    return _emulated.xp if cuda_mode() == "emulate" else np


def _dim3(d):
    d = (int(d),) if np.isscalar(d) else tuple(int(v) for v in d)
    if not 1 <= len(d) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions, got {d}")
    return d + (1,) * (3 - len(d))


def _check_args(name, args):
    for i, a in enumerate(args):
        if isinstance(a, np.generic):
            continue
        if isinstance(a, np.ndarray) or is_cupy(a):
            if a.size and not a.flags.c_contiguous:
                raise ValueError(f"{name}: argument {i} is not C-contiguous (kernels see a bare pointer)")
            continue
        raise TypeError(
            f"{name}: argument {i} is a {type(a).__name__}; pass arrays or typed NumPy scalars "
            f"(np.int32(n), np.float32(x)), whose width the kernel's parameter fixes")


def launch(source_file, name, grid, block, args, shared_mem=0, benign_races=False):
    """Launch kernel ``name`` (a name expression of ``source_file``) over ``grid`` x ``block``.

    On CuPy arrays it runs on their GPU, on NumPy arrays in the emulator.
    ``benign_races=True`` turns the emulator's racecheck off for this launch: for a kernel
    whose races are intended (say, threads storing the same value); none of ours needs it.
    """
    if name not in name_expressions(source_file):
        raise KeyError(f"{name!r} is not listed in {source_file} (GPUDIFF_KERNEL lines: "
                       f"{', '.join(name_expressions(source_file))})")
    grid, block = _dim3(grid), _dim3(block)
    args = tuple(args)
    if events.listener is not None:
        events.listener.launch(source_file, name)
    _check_args(name, args)
    gpu_arrays = [a for a in args if is_cupy(a)]
    if gpu_arrays:
        _launch_cupy(source_file, name, grid, block, args, shared_mem, gpu_arrays[0])
    else:
        _launch_emulated(name, grid, block, args, shared_mem, benign_races)


_cupy_modules = {}  # (device id, source file) -> cupy.RawModule, compiled on first use


def cupy_module(source_file, device_id):
    """The RawModule of ``source_file`` for one device (NVRTC runs once per device)."""
    key = (device_id, source_file)
    mod = _cupy_modules.get(key)
    if mod is None:
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(device_id):
            mod = cupy.RawModule(code=module_source(source_file), options=NVRTC_OPTIONS,
                                 name_expressions=name_expressions(source_file))
            mod.compile()
        _cupy_modules[key] = mod
    return mod


def _launch_cupy(source_file, name, grid, block, args, shared_mem, some_array):
    cupy = importlib.import_module("cupy")
    dev = some_array.device.id
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            raise TypeError(f"{name}: argument {i} is a NumPy array among CuPy arrays")
        if is_cupy(a) and a.device.id != dev:
            raise ValueError(f"{name}: arrays on devices cuda:{dev} and cuda:{a.device.id}")
    kernel = cupy_module(source_file, dev).get_function(name)
    with cupy.cuda.Device(dev):
        kernel(grid, block, args, shared_mem=int(shared_mem))


def _launch_emulated(name, grid, block, args, shared_mem, benign_races=False):
    try:
        host = importlib.import_module("gpudiff._cuda_host")
    except ImportError as e:
        raise ImportError(
            "gpudiff._cuda_host (the CUDA emulator) is not built: run "
            "`pip install -e . --no-build-isolation`") from e
    check = _emulator["check"]
    stats = host.launch(name, grid, block, int(shared_mem), list(args), order=_emulator["order"],
                        seed=_emulator["seed"], shuffle_blocks=_emulator["shuffle_blocks"],
                        race="race" in check and not benign_races, init="init" in check)
    last_emulator_stats.clear()
    last_emulator_stats.update(stats)


@functools.lru_cache(maxsize=None)
def _gpu_sm_count(device_id):
    cupy = importlib.import_module("cupy")
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def sm_count(a):
    """Streaming multiprocessors of the device holding array ``a`` (132 when emulated)."""
    return _gpu_sm_count(a.device.id) if is_cupy(a) else EMULATED_SM_COUNT


# ---- launch configuration (shared by every wrapper module) -----------------------------------
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
THREADS = 256                       # elementwise / gather kernels, direct conv
ELEMENTWISE_THREADS = 256
WARP_ROW_MAX_COLS = 256             # rows up to this long get a warp each, longer ones a block
ROWS_PER_BLOCK = 4                  # warp-per-row blocks: (32, 4) threads
SMALL_ROW_MAX_COLS = 32             # rows up to this long: a thread per row on a shared tile
SMALL_ROW_THREADS = {4: 128, 8: 64}  # rows per tile by itemsize: tiles of <= 34 KB shared
MAX_RESIDENT_THREADS_PER_SM = 2048  # H100 (sm_90) and A100 (sm_80)


def ctype(*arrays):
    """'float' / 'double' when all (non-None) arrays share that dtype, else None."""
    arrays = [a for a in arrays if a is not None]
    dt = arrays[0].dtype
    if any(a.dtype != dt for a in arrays):
        return None
    return CTYPES.get(dt)


def i32(*vals):
    """Python ints as the kernels' int parameters."""
    return tuple(np.int32(v) for v in vals)


def wave_blocks(a, threads_per_block):
    """Blocks resident on ``a``'s device at once: grids past this are grid-strided."""
    return sm_count(a) * max(1, MAX_RESIDENT_THREADS_PER_SM // threads_per_block)


def grid_1d(total, a, threads=THREADS):
    """Blocks for a grid-strided loop over ``total`` items, one a thread, at most a wave."""
    return max(1, min(math.ceil(total / threads), wave_blocks(a, threads)))


def elementwise_config(n, itemsize, a):
    """(grid, block) for a flat loop over n elements, 16 bytes per thread per step."""
    per_block = ELEMENTWISE_THREADS * (16 // itemsize)
    grid = max(1, min(math.ceil(n / per_block), wave_blocks(a, ELEMENTWISE_THREADS)))
    return grid, ELEMENTWISE_THREADS


def row_config(rows, cols, a):
    """(grid, block) for a row kernel: a warp per row for short rows, a block per row else.

    Block-per-row threads: the power of 2 covering about 4 columns each, 64 to 512.
    """
    if cols <= WARP_ROW_MAX_COLS:
        block = (32, ROWS_PER_BLOCK, 1)
        grid = math.ceil(rows / ROWS_PER_BLOCK)
    else:
        threads = min(512, max(64, 1 << (math.ceil(cols / 4) - 1).bit_length()))
        block = (threads, 1, 1)
        grid = rows
    return max(1, min(grid, wave_blocks(a, block[0] * block[1]))), block


def small_row_config(rows, cols, itemsize, buffers, extra, a):
    """(grid, block, shared bytes) for a *_small row kernel (common.cuh: short rows).

    A block of R threads takes R rows at a time; its shared memory holds ``buffers`` tiles of
    R rows padded to an odd stride, plus ``extra`` elements.
    """
    threads = SMALL_ROW_THREADS[itemsize]
    shared = (buffers * threads * (cols | 1) + extra) * itemsize
    grid = max(1, min(math.ceil(rows / threads), wave_blocks(a, threads)))
    return grid, (threads, 1, 1), shared


def address(a):
    """The device address of an array's first element (alignment checks, pointer tables)."""
    return int(a.data.ptr) if is_cupy(a) else int(a.ctypes.data)


def fits_int32(*sizes):
    """Whether every size fits the kernels' int (32-bit) indexing."""
    return max(sizes) <= INT32_MAX


def unbatch(a):
    """(N, C, H, W) view of a 3-D (unbatched) or 4-D array, and whether it was unbatched."""
    return (a[None], True) if a.ndim == 3 else (a, False)
