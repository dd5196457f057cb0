"""The emulated CUDA device's memory (GPUDIFF_CUDA=emulate): NumPy arrays with a GPU's habits.

``xp`` is the emulated device's array module (``Device('cuda').xp``). It is NumPy, except
that every array it hands out is device memory of a pool that behaves like CuPy's:

* ``empty`` / ``empty_like`` start poisoned: every byte 0xff (NaN for floats, -1 for
  integers), the emulator's poison, so a kernel or a reference that reads memory nobody
  wrote sees NaN, and the emulator's initcheck flags the read (docs/EMULATOR.md);
* ``pool`` accounts live bytes as CuPy's default memory pool does on a GPU: an array that
  owns its memory holds a block of its size rounded up to 512 bytes until it is garbage;
  a freed block stays reserved in the pool (reused by the next allocation of its size)
  until ``empty_cache()``. ``gpudiff.cuda.memory_allocated()`` and friends read it.

Every function of ``xp`` is NumPy's, wrapped: the arrays it returns that own their memory
(not views) become device blocks, and NumPy scalars come back as 0-d arrays, as CuPy's do.
``asarray`` / ``ascontiguousarray`` of an array leave it where it is (as on NumPy; an array
that no function of ``xp`` made, e.g. one made by a method such as ``a.copy()``, becomes a
block then); ``to_device`` copies onto the device. Arrays made by ndarray methods and
operators (``a.copy()``, ``a + b``) are not seen until an ``xp`` function returns them.
"""
import bisect
import collections
import ctypes
import functools
import threading
import weakref

import numpy as np

GRANULE = 512  # CuPy's pool rounds every allocation up to this many bytes

_ndarray = np.ndarray


class _Block(weakref.ref):
    """A live block: a weak reference to the array owning it, with its rounded size."""

    __slots__ = ("size", "key")

    def __new__(cls, array, callback, size):
        return super().__new__(cls, array, callback)

    def __init__(self, array, callback, size):
        super().__init__(array, callback)
        self.size, self.key = size, id(array)


class MemoryPool:
    """Live and cached bytes of the emulated device, kept as CuPy's memory pool keeps them.

    ``used_bytes()`` (memory_allocated): blocks of live arrays; ``total_bytes()``
    (memory_reserved): those plus freed blocks cached for reuse; ``peak``: the most
    ``used_bytes`` since ``reset_peak()``. A block is freed when its array is garbage
    (a weak reference's callback, which only queues it: the counts are settled under a lock
    on the next allocation or query, so garbage collection at any moment is safe).
    """

    def __init__(self):
        self._live = {}                    # id(array) -> _Block
        self._dead = collections.deque()   # blocks whose array died, not yet settled
        self._cached = []                  # sizes of freed blocks kept for reuse, sorted
        self._lock = threading.Lock()
        self.used = self.cached = self.peak = 0

    def track(self, a):
        """Make ``a`` (an ndarray owning its memory) a block of this pool; returns ``a``."""
        with self._lock:
            if self._dead:
                self._settle()
            if id(a) in self._live:
                return a
            size = -(-a.nbytes // GRANULE) * GRANULE
            if size == 0:  # CuPy allocates nothing for an empty array
                return a
            self._live[id(a)] = _Block(a, self._dead.append, size)
            i = bisect.bisect_left(self._cached, size)
            if i < len(self._cached) and self._cached[i] == size:  # reuse a cached block
                del self._cached[i]
                self.cached -= size
            self.used += size
            if self.used > self.peak:
                self.peak = self.used
        return a

    def _settle(self):
        while self._dead:
            b = self._dead.popleft()
            if self._live.get(b.key) is b:
                del self._live[b.key]
                self.used -= b.size
                bisect.insort(self._cached, b.size)
                self.cached += b.size

    def holds(self, a):
        """Whether ``a`` is a live block of this pool."""
        b = self._live.get(id(a))
        return b is not None and b() is a

    def used_bytes(self):
        with self._lock:
            self._settle()
            return self.used

    def total_bytes(self):
        with self._lock:
            self._settle()
            return self.used + self.cached

    def max_used_bytes(self):
        with self._lock:
            self._settle()
            return self.peak

    def reset_peak(self):
        with self._lock:
            self._settle()
            self.peak = self.used

    def free_all_blocks(self):
        """Give the cached (freed) blocks back: memory_reserved drops to memory_allocated."""
        with self._lock:
            self._settle()
            self._cached.clear()
            self.cached = 0


pool = MemoryPool()


def _adopt(r):
    """What an xp function returned, as device memory: owning arrays become blocks, NumPy
    scalars 0-d arrays (as CuPy returns them); tuples and lists element by element."""
    t = type(r)
    if t is _ndarray:
        if r.base is None:
            pool.track(r)
        return r
    if isinstance(r, np.generic):
        return pool.track(np.asarray(r))  # (0-d asarray of a scalar: a new owning array)
    if t is tuple or t is list:
        return t(_adopt(v) for v in r)
    return r


def own(arrays):
    """Make the memory under each of ``arrays`` (its base's, for a view) a device block: for
    arrays that a device tensor holds but that no ``xp`` function made (``a.copy()``,
    ``a + b``, ``a.astype(t)``)."""
    for a in arrays:
        while isinstance(a.base, _ndarray):
            a = a.base
        if a.base is None:
            pool.track(a)


def poison(a):
    """Fill ``a`` with 0xff bytes (NaN for floats, -1 for integers): the emulator's poison."""
    if a.dtype.hasobject or a.size == 0:
        return a
    if a.flags.c_contiguous or a.flags.f_contiguous:
        ctypes.memset(a.ctypes.data, 0xFF, a.nbytes)
    else:  # empty_like of a strided prototype: dense, in the prototype's axis order
        a[...] = np.frombuffer(b"\xff" * a.dtype.itemsize, a.dtype)[0]
    return a


class _UFunc:
    """A NumPy ufunc whose results (calls, reduce, accumulate, outer) are device memory."""

    def __init__(self, f):
        self._f = f
        self.__name__ = f.__name__
        self.__doc__ = f.__doc__

    def __call__(self, *args, **kw):
        return _adopt(self._f(*args, **kw))

    def __getattr__(self, name):
        attr = getattr(self._f, name)
        if name in ("reduce", "accumulate", "reduceat", "outer"):
            attr = _function(attr)
        setattr(self, name, attr)
        return attr

    def __repr__(self):
        return f"<emulated-device ufunc '{self.__name__}'>"


def _function(f):
    @functools.wraps(f)
    def call(*args, **kw):
        return _adopt(f(*args, **kw))
    return call


class ArrayModule:
    """NumPy for the emulated device (see the module's docstring); other attributes (dtypes,
    constants, ``ndarray``, submodules) are NumPy's own."""

    __name__ = "gpudiff.runtime.emulated.xp"

    def __init__(self):
        self.pool = pool

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            attr = _UFunc(attr)
        elif callable(attr) and not isinstance(attr, type):
            attr = _function(attr)
        setattr(self, name, attr)  # looked up once
        return attr

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return pool.track(poison(np.empty(shape, dtype, order)))

    @staticmethod
    def empty_like(prototype, dtype=None, order="K", subok=True, shape=None):
        return pool.track(poison(np.empty_like(prototype, dtype, order, subok, shape)))

    def __repr__(self):
        return "<module 'numpy' on the emulated CUDA device (gpudiff.runtime.emulated)>"


xp = ArrayModule()


def to_device(a):
    """A copy of the host array ``a`` on the emulated device (a block already there passes)."""
    if type(a) is _ndarray and pool.holds(a):
        return a
    return pool.track(np.array(a, copy=True))
