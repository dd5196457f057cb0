"""Whole-step capture: the plan that ``gpudiff.Graph`` (and ``gpudiff.cuda.CUDAGraph`` off a
real GPU) records and replays. docs/GRAPHS.md has the user's side.

While a capture is active (``active`` is a ``Plan``), every unit of work the engine runs is
run once as usual and also appended to the plan as a *step*: a closure that redoes the same
array work on the same arrays. The units, and who records them:

    an op's forward           ops.apply           (outputs copied into the captured arrays)
    a backward pass           autograd.graph      (leaf .grad written into captured arrays)
    an optimizer step         optim.Optimizer     (parameters, state, lr read at replay)
    an in-place Tensor write  tensor.py           (copy_, fill_, add_, ...)

``replay()`` runs the steps in order: no Tensor objects, no dispatch, no tape building, and
the arrays that tensors made during the capture hold are overwritten in place, as a CUDA
graph overwrites its pool. Work nested inside a step (the ops a backward formula runs, the
in-place writes an optimizer makes) is not recorded again: ``depth`` counts the steps being
run at capture time.

PyTorch's capture records and does not run the work; here the work runs (it is how the plan
learns its arrays), so the plan keeps the values that existed before the capture: the first
write to an array during capture saves a copy (``will_write``) and ``end`` puts every saved
copy back, and ``on_end`` callbacks restore Python-side state (an optimizer's state dict).

On a real GPU the capture is CuPy's stream capture instead (gpudiff/cuda/graphs.py) and this
plan only watches for errors (``record`` is False): the GPU itself does not run captured work.
Device work that must read values the host changes between replays (a capturable optimizer
step: lr, step counts) goes through ``launch`` and reads them from device scalars that a
``pre_replay`` hook writes. ``Plan(record=False, simulate=True)`` is that capture simulated
off a GPU (tests): ``launch`` keeps the device work as a step, and ``replay`` runs the
``pre_replay`` hooks and then that work, as a graph launch would.
"""
import threading

import numpy as np

active = None  # the Plan being captured, or None (read on every op: keep it a plain global)
_lock = threading.Lock()


class CaptureError(RuntimeError):
    """An operation that a captured graph cannot contain (docs/GRAPHS.md lists them)."""


class Plan:
    """A recorded step: ``steps`` (closures), the arrays it keeps, and its restore list."""

    def __init__(self, record=True, simulate=False):
        self.record = record     # False: a real-GPU capture (CuPy records the kernels)
        self.simulate = simulate  # (record False only) keep launch()'s work instead (tests)
        self.steps = []
        self.depth = 0
        self.pre_replay = []     # closures run before each replay (host values -> buffers)
        self.statics = []        # (weakref to Tensor, its array, shape): checked at replay
        self._backups = {}       # id(array) -> (array, copy of its values before capture)
        self._seen = set()       # ids of tensors registered as static or made by the capture
        self._seeds = {}         # device -> [base seed, replay counter, seeds handed out]
        self._on_end = []

    # ---- recording ------------------------------------------------------------------------
    def will_write(self, *arrays):
        """``arrays`` are about to be written in place at capture time: keep their values so
        that ``end`` can undo the write (capture must not change what existed before it)."""
        if not self.record:
            return
        for a in arrays:
            if a is not None and id(a) not in self._backups:
                self._backups[id(a)] = (a, a.copy())

    def add(self, step):
        if self.record:
            self.steps.append(step)

    def launch(self, fn):
        """Device work of a real-GPU capture (``record`` False) that reads only fixed arrays:
        run now, under CuPy's stream capture, its kernels are recorded into the graph (they do
        not run). Simulated (``simulate``), nothing records kernels: ``fn`` is kept as a step
        instead, so each ``replay`` reruns it on the same arrays, as the graph would."""
        if self.simulate:
            self.steps.append(fn)
        else:
            self.run(fn)

    def run(self, fn, *args):
        """Run ``fn(*args)`` now with recording off (its inner work belongs to the step)."""
        self.depth += 1
        try:
            return fn(*args)
        finally:
            self.depth -= 1

    def device_seed(self, device, draw):
        """A dropout seed for this capture: ``base + counter * golden + index`` in device
        arrays, where ``base`` is drawn once (``draw()``) and ``counter`` is bumped by a
        captured step once per replay: each replay draws new masks, as PyTorch's capture
        does with its Philox seed and offset."""
        state = self._seeds.get(device)
        if state is None:
            xp = device.xp
            base = xp.full((), draw(), dtype=np.uint64)  # (a fill kernel: no copy)
            counter = xp.zeros((), dtype=np.uint64)

            def bump():
                counter[...] += np.uint64(1)
            self.add(bump)
            bump()
            state = self._seeds[device] = [base, counter, 0]
        state[2] += 1
        return DeviceSeed(state[0], state[1], state[2])

    def on_end(self, fn):
        self._on_end.append(fn)

    def static(self, tensor, weakref_type):
        """The plan reads or writes ``tensor``'s array: unless the capture made it, check at
        each replay that the tensor still exists and still holds that array."""
        if id(tensor) not in self._seen:
            self._seen.add(id(tensor))
            self.statics.append((weakref_type(tensor), tensor.array, tensor.shape))

    def made(self, tensors):
        """``tensors`` were made by the capture (the plan keeps them alive)."""
        self._seen.update(id(t) for t in tensors)

    def end(self):
        """Put back what the capture-time run changed: array values, then Python state."""
        for a, saved in self._backups.values():
            a[...] = saved
        self._backups.clear()
        for fn in reversed(self._on_end):
            fn()
        self._on_end.clear()

    # ---- replay ---------------------------------------------------------------------------
    def replay(self):
        for fn in self.pre_replay:
            fn()
        for step in self.steps:
            step()


class DeviceSeed:
    """A dropout seed held in device arrays (``Plan.device_seed``): ``value()`` is a 0-d
    uint64 array computed on the device, so a replay never reads it on the host."""

    __slots__ = ("base", "counter", "index")

    def __init__(self, base, counter, index):
        self.base, self.counter, self.index = base, counter, index

    def value(self):
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as on the GPU
            return self.base + self.counter * np.uint64(0x9E3779B97F4A7C15) + \
                np.uint64(self.index)

    def __repr__(self):
        return f"DeviceSeed(#{self.index})"


def recording():
    """The active plan if this point of the code should record a step, else None."""
    p = active
    if p is not None and p.depth == 0:
        return p
    return None


def host_check(fn, *args):
    """Run ``fn(*args)``, an input check that reads device values on the host (target
    ranges, index bounds). Inside a capture on the CPU or the emulated device the plan runs it
    again at every replay (the values change); a real GPU's captured graph cannot read
    device values, so there it checks the capture's values only (PyTorch asserts in the
    kernel instead)."""
    p = active
    if p is not None and p.depth == 0 and p.record:
        p.add(lambda: fn(*args))
    fn(*args)


_WHY = {  # what cannot be in a captured graph, and what to do instead
    "sync": "not allowed while capturing a graph: it needs the host to read device values (a "
            "synchronization), and a captured graph replays device work only. Do it outside "
            "the `with graph(g):` block (e.g. read the static output after g.replay()).",
    "shape": "its output shape depends on the data (a host synchronization), which a "
             "captured graph cannot contain: replays must keep every shape fixed. Use a "
             "fixed-shape form (e.g. torch.where(mask, x, 0) instead of x[mask]) or move it "
             "out of the capture.",
    "alloc": "copies host data to the device (or between devices), which cannot be "
             "captured: a replay would reuse the values of the capture. Create the tensor "
             "before the capture and copy_() new values into it before each replay.",
}


def _refuse(what, why):
    if active is not None and active.depth == 0:
        raise CaptureError(f"{what}: {_WHY[why]}")


def check_sync(what):
    """``what`` needs the host to see device values (or to copy to/from the host): not
    possible inside a capture, where the work does not run (on a GPU) or runs only once."""
    if active is not None:  # (the common case stops here: no second call)
        _refuse(what, "sync")


def check_shape_known(what):
    """``what`` has an output shape that depends on the values: a graph's shapes are fixed."""
    if active is not None:  # (the common case stops here: no second call)
        _refuse(what, "shape")


def check_alloc(what):
    """``what`` makes device memory from host data or moves it between devices."""
    if active is not None:  # (the common case stops here: no second call)
        _refuse(what, "alloc")


def begin(plan):
    global active
    with _lock:
        if active is not None:
            raise CaptureError(
                "capture_begin: a graph is already being captured (nested captures are not "
                "supported: end the first capture before beginning another)")
        active = plan


def finish(plan):
    global active
    with _lock:
        if active is not plan:
            raise CaptureError("capture_end: this graph is not the one being captured")
        active = None
    plan.end()


# ---- a real GPU: streams and CuPy's stream capture ---------------------------------------
def _cp():
    from . import _cupy
    return _cupy


class Stream:
    """A CUDA stream on a GPU (CuPy's); on the emulated device and the CPU, where work runs
    in order on the host, a stand-in with the same methods."""

    def __init__(self, priority=0, _handle=None):
        cp = _cp()
        self.cupy = _handle if _handle is not None else (
            cp.cuda.Stream(non_blocking=True) if cp is not None else None)

    def wait_stream(self, other):
        if self.cupy is not None and other.cupy is not None:
            self.cupy.wait_event(other.cupy.record())

    def wait_event(self, event):
        if self.cupy is not None and getattr(event, "cupy", None) is not None:
            self.cupy.wait_event(event.cupy)

    def record_event(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def synchronize(self):
        if self.cupy is not None:
            self.cupy.synchronize()

    def query(self):
        return True if self.cupy is None else bool(self.cupy.done)

    def __enter__(self):
        _stream_stack.append(self)
        if self.cupy is not None:
            self.cupy.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cupy is not None:
            self.cupy.__exit__(*exc)
        _stream_stack.pop()
        return False

    def __eq__(self, other):
        return isinstance(other, Stream) and (self is other or (
            self.cupy is not None and self.cupy is other.cupy))

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<gpudiff.cuda.Stream {'cupy' if self.cupy is not None else 'host'}>"


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        cp = _cp()
        self.cupy = cp.cuda.Event(block=blocking, disable_timing=not enable_timing) \
            if cp is not None else None

    def record(self, stream=None):
        if self.cupy is not None:
            self.cupy.record((stream or current_stream()).cupy)

    def synchronize(self):
        if self.cupy is not None:
            self.cupy.synchronize()

    def query(self):
        return True if self.cupy is None else bool(self.cupy.done)

    def wait(self, stream=None):
        (stream or current_stream()).wait_event(self)

    def elapsed_time(self, end):
        if self.cupy is None:
            raise RuntimeError("Event.elapsed_time: no GPU (events time GPU work only)")
        return _cp().cuda.get_elapsed_time(self.cupy, end.cupy)


_default_stream = None
_stream_stack = []


def current_stream():
    global _default_stream
    if _stream_stack:
        return _stream_stack[-1]
    if _default_stream is None:
        cp = _cp()
        _default_stream = Stream(_handle=cp.cuda.get_current_stream() if cp else None)
    return _default_stream


def default_stream():
    current_stream()
    return _default_stream


_gpu_pools = {}  # pool token -> CuPy MemoryPool private to the graphs sharing it


class GpuCapture:
    """CuPy stream capture for one CUDAGraph. Kernels are recorded, not run. Every array made
    during the capture comes from a memory pool private to the graph (PyTorch's graph pool),
    so memory the graph writes on replay is never handed to anyone else."""

    def __init__(self, pool, stream):
        cp = _cp()
        self.cp = cp
        self.pool = _gpu_pools.setdefault(pool, cp.cuda.MemoryPool())
        self.stream = stream if stream is not None else Stream()
        self.graph = None

    def begin(self):
        cp = self.cp
        self._prev_alloc = cp.cuda.get_allocator()
        cp.cuda.set_allocator(self.pool.malloc)
        self.stream.__enter__()
        mode = getattr(cp.cuda.runtime, "streamCaptureModeRelaxed", None)
        try:  # relaxed: the private pool may call cudaMalloc while capturing
            self.stream.cupy.begin_capture(mode=mode) if mode is not None else \
                self.stream.cupy.begin_capture()
        except BaseException:
            self.stream.__exit__(None, None, None)
            cp.cuda.set_allocator(self._prev_alloc)
            raise

    def end(self):
        try:
            self.graph = self.stream.cupy.end_capture()
        finally:
            self.stream.__exit__(None, None, None)
            self.cp.cuda.set_allocator(self._prev_alloc)

    def launch(self):
        self.graph.launch(current_stream().cupy)
