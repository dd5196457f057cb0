"""``gpudiff.profiler``: where the time goes, per op, with PyTorch's spelling::

    from gpudiff.profiler import profile, record_function, ProfilerActivity

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        with record_function("forward"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    prof.export_chrome_trace("trace.json")     # chrome://tracing or ui.perfetto.dev

What it sees (the engine reports it through ``gpudiff.runtime.events.listener``):

- every op's ``apply``: its total time, split into *kernel* (the op's forward: the compiled
  kernel or the xp reference) and *dispatch* (everything else: device checks, wrapping,
  recording the tape);
- which kernel ran: a C++ kernel of the CPU table ("C++ conv2d"), the reference ("NumPy
  reference"), or the CUDA kernels launched ("CUDA conv2d_fwd_igemm<float, 64, 64, 8, 4, 4>"),
  with the convolution algorithm (``gpudiff.backends.cuda.last_conv_algorithm``);
- every backward node, as a row named like PyTorch's (``Conv2dBackward0``), around the ops
  its formula runs;
- ``record_function`` ranges (and ``ProfilerStep#N`` after ``prof.step()``), around what
  runs inside them.

Self time excludes the rows nested inside (ops inside a backward node or a range); total
time includes them. Devices: 'cpu'; the emulated CUDA device, labelled "cuda (emulated)" (its
times are the CPU emulator's, not a GPU's); a real GPU, where ``ProfilerActivity.CUDA`` adds
GPU times from ``cupy.cuda.Event`` pairs (see ``_GpuClock``; not yet run on a GPU).

Not supported: ``schedule=`` (profile the steps you want with start()/stop() or the context
manager; ``step()`` marks step boundaries), ``profile_memory``, ``with_stack``,
``with_flops``, ``with_modules``. One profiler at a time, and what runs in other threads is
recorded under their thread ids only when it goes through the engine's hooks.
"""
import contextlib
import enum
import importlib
import json
import os
import tempfile
import threading
from time import perf_counter_ns

from .backends import cuda as _backends_cuda
from .runtime import events

__all__ = [
    "EventList",
    "FunctionEvent",
    "FunctionEventAvg",
    "ProfilerActivity",
    "profile",
    "record_function",
    "supported_activities",
]

_active = None            # the profile() that is recording, or None
_get_ident = threading.get_ident

# kinds of records, in the order they nest when two start and end at the same time
_RANGE, _BACKWARD, _OP, _KERNEL, _LAUNCH = range(5)
_KIND_NAMES = {_RANGE: "user_annotation", _BACKWARD: "backward", _OP: "cpu_op",
               _KERNEL: "kernel"}
_CONV_PASS = {"conv2d": "forward", "conv2d_backward_input": "backward_input",
              "conv2d_backward_weight": "backward_weight"}


class ProfilerActivity(enum.Enum):
    """What to profile: CPU (always recorded) and CUDA (GPU times on a real GPU)."""
    CPU = "CPU"
    CUDA = "CUDA"


def supported_activities():
    """The activities this machine can profile: CPU, plus CUDA when a CUDA device exists
    (on the emulated device CUDA adds nothing: its kernels run on the CPU)."""
    from . import runtime
    acts = {ProfilerActivity.CPU}
    if runtime.cuda_mode() is not None:
        acts.add(ProfilerActivity.CUDA)
    return acts


# ---- record_function ----------------------------------------------------------------------
class record_function(contextlib.ContextDecorator):
    """A named range: ``with record_function("forward"): ...`` or ``@record_function("f")``.

    Its total time includes the ops run inside it; its self time excludes them. Outside a
    profile it costs one global read.
    """

    def __init__(self, name, args=None):
        self.name = str(name)
        self.args = args
        self._starts = []          # a stack: the same object may be entered recursively

    def __enter__(self):
        self._starts.append(perf_counter_ns() if _active is not None else None)
        return self

    def __exit__(self, *exc):
        t0 = self._starts.pop()
        prof = _active
        if t0 is not None and prof is not None:
            prof._records.append((_RANGE, self.name, None, t0, perf_counter_ns(), 0, None,
                                  _get_ident()))
        return False


# ---- the listener ---------------------------------------------------------------------------
class _Listener:
    """What events.listener holds while a profile records (the interface of events.py)."""

    def __init__(self, prof):
        self.prof = prof
        self.records = prof._records

    def op_begin(self, name, inputs):
        pass  # the GPU clock brackets an op from the previous op's end (see _GpuClock)

    def op(self, name, device, t0, t_fwd0, t_fwd1, t1, shapes):
        prof = self.prof
        self.records.append((_OP, name, device, t0, t1, t_fwd1 - t_fwd0,
                             shapes if prof.record_shapes else None, _get_ident()))
        if prof._gpu is not None and device is not None and device.type == "cuda" \
                and not device.emulated:
            prof._gpu.mark(len(self.records) - 1, device)

    def kernel(self, name, device, t0, t1, declined):
        # a kernel that declined (returned None): the op then ran its reference
        self.records.append((_KERNEL, name, device, t0, t1, 0,
                             "declined" if declined else _conv_algorithm(name, device),
                             _get_ident()))

    def launch(self, source_file, kernel_name):
        t = perf_counter_ns()
        self.records.append((_LAUNCH, kernel_name, None, t, t, 0, None, _get_ident()))

    def backward(self, name, t0, t1):
        self.records.append((_BACKWARD, name, None, t0, t1, 0, None, _get_ident()))


def _conv_algorithm(name, device):
    """The algorithm a CUDA convolution kernel just used (read right after it ran)."""
    if device is None or device.type != "cuda" or name not in _CONV_PASS:
        return None
    return _backends_cuda.last_conv_algorithm.get(_CONV_PASS[name])


class _GpuClock:
    """GPU times on a real GPU (CuPy): a ``cupy.cuda.Event`` is recorded on the op's device
    each time an op returns, and an op's CUDA time is the GPU time between the previous
    event on that device and its own. The engine reports an op when it returns, so the pair
    brackets the GPU work the op enqueued (plus anything enqueued between two ops, and GPU
    idle time between them). Resolved after a synchronize at stop(). Not yet run on a GPU.
    """

    def __init__(self):
        self.last = {}       # device index -> (event, record index or None for the start)
        self.pairs = {}      # record index -> (start event, end event, device index)
        self.start = {}      # device index -> the first event on it

    def _event(self, device):
        cp = device.xp                        # cupy, for a real 'cuda' device
        with cp.cuda.Device(device.index or 0):
            ev = cp.cuda.Event()
            ev.record()
        return ev

    def begin(self, device):
        ev = self._event(device)
        self.last[device.index or 0] = ev
        self.start.setdefault(device.index or 0, ev)

    def mark(self, i, device):
        idx = device.index or 0
        if idx not in self.last:
            self.begin(device)
        ev = self._event(device)
        self.pairs[i] = (self.last[idx], ev, idx)
        self.last[idx] = ev

    def resolve(self):
        """{record index: (start_us from the device's first event, duration_us, device)}."""
        for ev in self.last.values():
            ev.synchronize()
        return {i: (1e3 * _elapsed_ms(self.start[idx], a), 1e3 * _elapsed_ms(a, b), idx)
                for i, (a, b, idx) in self.pairs.items()}


def _elapsed_ms(a, b):
    """Milliseconds between two recorded cupy.cuda.Events (cupy.cuda.get_elapsed_time)."""
    cuda = importlib.import_module(type(a).__module__.split(".")[0]).cuda
    return cuda.get_elapsed_time(a, b)


# ---- the profiler ----------------------------------------------------------------------------
class profile:
    """Record what the engine runs: ``with profile() as prof: ...`` or start() / stop().

    activities: ProfilerActivity values (default: CPU, plus CUDA where a CUDA device
    exists). record_shapes: keep each op's input shapes (``key_averages(
    group_by_input_shape=True)``, and "Input Dims" in the trace). on_trace_ready: called
    with the profiler at stop(). ``step()`` marks the end of a training step: the time
    between marks becomes ``ProfilerStep#N`` ranges.
    """

    def __init__(self, *, activities=None, schedule=None, on_trace_ready=None,
                 record_shapes=False, profile_memory=False, with_stack=False,
                 with_flops=False, with_modules=False, use_cuda=None):
        if schedule is not None:
            raise NotImplementedError(
                "gpudiff.profiler.profile: schedule= is not supported; profile only the steps "
                "you want (start()/stop() or the with-block), and call step() between steps")
        for flag, name in ((profile_memory, "profile_memory"), (with_stack, "with_stack"),
                           (with_flops, "with_flops"), (with_modules, "with_modules")):
            if flag:
                raise NotImplementedError(f"gpudiff.profiler.profile: {name}=True is not "
                                          f"supported")
        if activities is None:
            activities = supported_activities()
            if use_cuda is False:
                activities.discard(ProfilerActivity.CUDA)
        activities = set(activities)
        for a in activities:
            if not isinstance(a, ProfilerActivity):
                raise TypeError(f"gpudiff.profiler.profile: activities must be "
                                f"ProfilerActivity values, got {a!r}")
        self.activities = activities
        self.record_shapes = bool(record_shapes)
        self.on_trace_ready = on_trace_ready
        self.step_num = 0
        self._records = []
        self._running = False
        self._t_start = self._t_stop = None
        self._step_marks = []
        self._first_step = 0
        self._gpu = None
        self._gpu_times = {}
        self._events = None
        self._listener = None

    # -- recording --
    def start(self):
        global _active
        if self._running:
            raise RuntimeError("gpudiff.profiler.profile: start() called twice")
        if _active is not None or events.listener is not None:
            raise RuntimeError("gpudiff.profiler.profile: another profiler is already "
                               "recording (one at a time)")
        from . import runtime
        self._records.clear()
        self._events, self._step_marks, self._gpu_times = None, [], {}
        self._first_step = self.step_num
        self._gpu = None
        if ProfilerActivity.CUDA in self.activities and runtime.cuda_mode() == "gpu":
            self._gpu = _GpuClock()
        self._listener = _Listener(self)
        self._running = True
        _active = self
        self._t_start = perf_counter_ns()
        events.listener = self._listener
        return self

    def stop(self):
        global _active
        if not self._running:
            return self
        events.listener = None
        self._t_stop = perf_counter_ns()
        _active = None
        self._running = False
        if self._step_marks:
            self._step_marks.append(self._t_stop)
        if self._gpu is not None:
            self._gpu_times = self._gpu.resolve()
        if self.on_trace_ready is not None:
            self.on_trace_ready(self)
        return self

    def step(self):
        """The end of a training step: the time since the previous step() (or start())
        becomes a ``ProfilerStep#N`` range around what ran in it."""
        t = perf_counter_ns()
        if self._running:
            if not self._step_marks:
                self._step_marks.append(self._t_start)
            self._step_marks.append(t)
            self._events = None
        self.step_num += 1

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- results --
    def events(self):
        """Every recorded event (FunctionEvent, nested: .parent, .children), in start order."""
        if self._running:
            raise RuntimeError("gpudiff.profiler.profile: results are available after "
                               "stop() (or the end of the with-block)")
        if self._events is None:
            self._events = _build_events(self)
        return self._events

    def key_averages(self, group_by_input_shape=False):
        """The events summed per name (and per input shapes if group_by_input_shape, which
        needs record_shapes=True): an EventList of FunctionEventAvg with .table()."""
        if group_by_input_shape and not self.record_shapes:
            raise RuntimeError("key_averages(group_by_input_shape=True) needs "
                               "profile(record_shapes=True)")
        return self.events().key_averages(group_by_input_shape)

    def export_chrome_trace(self, path):
        """Write the events as Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev):
        complete events ("ph": "X", ts and dur in microseconds) nested as they ran."""
        data = json.dumps(self._chrome_trace(), separators=(",", ":")).encode()
        _write_atomic(path, data)
        return path

    def _chrome_trace(self):
        evs = self.events()
        pid = os.getpid()
        tids, out = {}, []
        names = {t.ident: t.name for t in threading.enumerate()}
        for e in evs:
            tid = tids.setdefault(e.thread, len(tids) + 1)
            args = {"device": e.device, "kernel": e.kernel,
                    "dispatch_us": round(e.dispatch_time_total, 3),
                    "kernel_us": round(e.kernel_time_total, 3)}
            if e.input_shapes is not None:
                args["Input Dims"] = [list(s) if s is not None else [] for s in e.input_shapes]
            out.append({"name": e.name, "cat": _KIND_NAMES[e.kind], "ph": "X", "pid": pid,
                        "tid": tid, "ts": round(e.time_range_start, 3),
                        "dur": round(e.cpu_time_total, 3), "args": args})
            for k in e.kernel_calls:       # the compiled kernel inside the op
                out.append({"name": k[0], "cat": "kernel", "ph": "X", "pid": pid,
                            "tid": tid, "ts": round(k[1], 3), "dur": round(k[2], 3),
                            "args": {"kernel": e.kernel}})
            for name, ts in e.launches:
                out.append({"name": name, "cat": "cuda_launch", "ph": "i", "s": "t",
                            "pid": pid, "tid": tid, "ts": round(ts, 3)})
            if e.cuda_span is not None:
                start, dur, idx = e.cuda_span
                out.append({"name": e.name, "cat": "gpu_op", "ph": "X", "pid": 1_000_000 + idx,
                            "tid": 0, "ts": round(start, 3), "dur": round(dur, 3),
                            "args": {"device": f"cuda:{idx}"}})
        meta = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                 "args": {"name": f"gpudiff (pid {pid})"}}]
        for ident, tid in tids.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": names.get(ident, f"thread {ident}")}})
        for idx in sorted({e.cuda_span[2] for e in evs if e.cuda_span is not None}):
            meta.append({"name": "process_name", "ph": "M", "pid": 1_000_000 + idx, "tid": 0,
                         "args": {"name": f"GPU {idx} (cupy.cuda.Event times)"}})
        return {"traceEvents": meta + out, "displayTimeUnit": "ms",
                "otherData": {"profiler": "gpudiff.profiler",
                              "activities": sorted(a.value for a in self.activities)}}


# ---- events and their averages ---------------------------------------------------------------
class FunctionEvent:
    """One recorded call: an op, a backward node, a record_function range or a kernel called
    outside any op. Times in microseconds from the profile's start."""

    __slots__ = (
        "_extra",
        "children",
        "cpu_time_total",
        "cuda_span",
        "device",
        "forward_us",
        "input_shapes",
        "kernel_calls",
        "kernel_labels",
        "kind",
        "launches",
        "name",
        "parent",
        "thread",
        "time_range_start",
    )

    def __init__(self, kind, name, device, t0_us, dur_us, forward_us, shapes, thread):
        self.kind, self.name, self.device, self.thread = kind, name, device, thread
        self.time_range_start, self.cpu_time_total = t0_us, dur_us
        self.forward_us, self.input_shapes = forward_us, shapes
        self.kernel_calls, self.launches, self.kernel_labels = [], [], []
        self.parent, self.children, self.cuda_span, self._extra = None, [], None, None

    @property
    def time_range_end(self):
        return self.time_range_start + self.cpu_time_total

    @property
    def self_cpu_time_total(self):
        return max(0.0, self.cpu_time_total - sum(c.cpu_time_total for c in self.children))

    @property
    def kernel_time_total(self):
        """The op's forward (kernel or reference); summed over the rows inside a range."""
        if self.kind == _OP:
            return self.forward_us
        if self.kind == _KERNEL:
            return self.cpu_time_total
        return sum(c.kernel_time_total for c in self.children)

    @property
    def dispatch_time_total(self):
        """An op's time outside its forward; summed over the rows inside a range (a range's
        or backward node's own Python is neither dispatch nor kernel)."""
        if self.kind == _OP:
            return max(0.0, self.cpu_time_total - self.forward_us)
        if self.kind == _KERNEL:
            return 0.0
        return sum(c.dispatch_time_total for c in self.children)

    @property
    def self_cuda_time_total(self):
        return 0.0 if self.cuda_span is None else self.cuda_span[1]

    @property
    def cuda_time_total(self):
        return self.self_cuda_time_total + sum(c.cuda_time_total for c in self.children)

    @property
    def kernel(self):
        return " | ".join(self.kernel_labels)

    def __repr__(self):
        return (f"<FunctionEvent {self.name} ({_KIND_NAMES[self.kind]}) "
                f"total={_fmt_time(self.cpu_time_total)} self={_fmt_time(self.self_cpu_time_total)}>")


class FunctionEventAvg:
    """The sum of the events of one key (name, or name and input shapes)."""

    def __init__(self, key, input_shapes=None):
        self.key, self.input_shapes = key, input_shapes
        self.count = 0
        self.cpu_time_total = self.self_cpu_time_total = 0.0
        self.dispatch_time_total = self.kernel_time_total = 0.0
        self.cuda_time_total = self.self_cuda_time_total = 0.0
        self.has_cuda = False
        self._kernels, self._devices = {}, {}

    def add(self, e):
        self.count += 1
        self.cpu_time_total += e.cpu_time_total
        self.self_cpu_time_total += e.self_cpu_time_total
        self.dispatch_time_total += e.dispatch_time_total
        self.kernel_time_total += e.kernel_time_total
        if e.cuda_span is not None or any(c.cuda_span is not None for c in e.children):
            self.has_cuda = True
            self.cuda_time_total += e.cuda_time_total
            self.self_cuda_time_total += e.self_cuda_time_total
        for k in e.kernel_labels:
            self._kernels[k] = None
        if e.device:
            self._devices[e.device] = None

    @property
    def cpu_time(self):
        return self.cpu_time_total / max(self.count, 1)

    @property
    def cuda_time(self):
        return self.cuda_time_total / max(self.count, 1)

    self_device_time_total = property(lambda self: self.self_cuda_time_total)
    device_time_total = property(lambda self: self.cuda_time_total)

    @property
    def kernel(self):
        return " | ".join(self._kernels)

    @property
    def device(self):
        return ", ".join(self._devices)

    def __repr__(self):
        return (f"<FunctionEventAvg {self.key} count={self.count} "
                f"self_cpu={_fmt_time(self.self_cpu_time_total)} "
                f"cpu_total={_fmt_time(self.cpu_time_total)}>")


class EventList(list):
    """A list of FunctionEvent (prof.events()) or FunctionEventAvg (key_averages())."""

    def key_averages(self, group_by_input_shape=False):
        rows = {}
        for e in self:
            shapes = tuple(e.input_shapes or ()) if group_by_input_shape else None
            key = (e.name, shapes)
            row = rows.get(key)
            if row is None:
                row = rows[key] = FunctionEventAvg(e.name, shapes)
            row.add(e)
        out = EventList(rows.values())
        out._grouped = group_by_input_shape
        return out

    @property
    def self_cpu_time_total(self):
        return sum(e.self_cpu_time_total for e in self)

    def table(self, sort_by=None, row_limit=100, max_name_column_width=55,
              max_kernel_column_width=100, header=None):
        """The rows as text, PyTorch's columns plus Dispatch, Kernel, Device and Kernel that
        ran. sort_by: an attribute (descending), e.g. "self_cpu_time_total",
        "cpu_time_total", "cpu_time", "count", "dispatch_time_total", "kernel_time_total",
        "self_cuda_time_total", "cuda_time_total"; None keeps the order of first call."""
        rows = list(self) if (not self or isinstance(self[0], FunctionEventAvg)) \
            else list(self.key_averages())
        return _table(rows, sort_by, row_limit, max_name_column_width,
                      max_kernel_column_width, header,
                      grouped=getattr(self, "_grouped", False))

    def export_chrome_trace(self, path):   # PyTorch has it on the EventList too
        raise NotImplementedError("use profile.export_chrome_trace(path)")


def _build_events(prof):
    """The raw records -> FunctionEvents nested by time (per thread), kernels and launches
    attached to the op (or kernel call) they ran in."""
    base = prof._t_start
    recs = list(prof._records)
    marks = prof._step_marks
    ident = _get_ident()
    for i in range(len(marks) - 1):
        recs.append((_RANGE, f"ProfilerStep#{prof._first_step + i}", None,
                     marks[i], marks[i + 1], 0, "step", ident))
    order = sorted(range(len(recs)), key=lambda i: (recs[i][7], recs[i][3], -recs[i][4],
                                                   recs[i][0]))
    gpu = prof._gpu_times
    evs = EventList()
    stack, thread = [], None
    for i in order:
        kind, name, dev, t0, t1, fwd, extra, tid = recs[i]
        if tid != thread:
            stack, thread = [], tid
        while stack and not (stack[-1][1] <= t0 and t1 <= stack[-1][2]):
            stack.pop()
        parent = stack[-1][0] if stack else None
        if kind == _LAUNCH:
            host = _attach_point(stack)
            if host is not None:
                host.launches.append((name, (t0 - base) / 1e3))
            continue
        if kind == _KERNEL and parent is not None and parent.kind == _OP:
            parent.kernel_calls.append((name, (t0 - base) / 1e3, (t1 - t0) / 1e3))
            parent._extra = (parent._extra or []) + [(name, extra)]
            continue
        if kind == _RANGE and extra == "step" and not _has_records_inside(recs, t0, t1, tid):
            continue
        e = FunctionEvent(kind, _row_name(kind, name), None, (t0 - base) / 1e3,
                          (t1 - t0) / 1e3, fwd / 1e3, extra if kind == _OP else None, tid)
        if kind == _KERNEL:
            e._extra = [(name, extra)]
        e.device = _device_label(dev) if kind in (_OP, _KERNEL) else ""
        e.parent = parent
        if i in gpu:
            e.cuda_span = gpu[i]
        if parent is not None:
            parent.children.append(e)
        evs.append(e)
        stack.append((e, t0, t1))
    for e in evs:
        _label(e)
    for e in evs:      # a backward node runs where its ops ran
        if e.kind == _BACKWARD and not e.device:
            e.device = next((c.device for c in _walk(e) if c.device), "")
    return evs


def _walk(e):
    for c in e.children:
        yield c
        yield from _walk(c)


def _has_records_inside(recs, t0, t1, tid):
    return any(r[7] == tid and r[0] != _RANGE and t0 <= r[3] and r[4] <= t1 for r in recs)


def _attach_point(stack):
    for e, _, _ in reversed(stack):
        if e.kind in (_OP, _KERNEL):
            return e
    return stack[-1][0] if stack else None


def _row_name(kind, name):
    if kind != _BACKWARD:
        return name
    if any(c.isupper() for c in name):       # a custom autograd.Function: its class name
        return name + "Backward"
    return "".join(p[:1].upper() + p[1:] for p in name.split("_")) + "Backward0"


def _device_label(dev):
    if dev is None:
        return ""
    if isinstance(dev, str):                 # a kernel table's device type (the bridge)
        return dev
    s = dev.type if not dev.index else f"{dev.type}:{dev.index}"
    return s + " (emulated)" if dev.emulated else s


def _label(e):
    """Which kernel ran in an op (or a kernel call outside ops): the C++ kernels of the CPU
    table, the CUDA kernels launched (and a convolution's algorithm), else the reference."""
    if e.kind not in (_OP, _KERNEL):
        return
    calls = [(name, extra) for name, extra in (e._extra or []) if extra != "declined"]
    dev = e.device
    if dev.startswith("cuda"):
        launched = " + ".join(f"CUDA {n}" for n in dict.fromkeys(n for n, _ in e.launches))
        algos = "/".join(dict.fromkeys(x for _, x in calls if x is not None))
        if not launched and calls:       # a kernel-table entry that ran through the xp module
            xp = "NumPy" if "emulated" in dev else "CuPy"
            launched = " + ".join(f"{n} ({xp}, no CUDA launch)" for n, _ in calls)
        label = (f"{algos}: " if algos else "") + launched
        if not label:
            label = "NumPy reference" if "emulated" in dev else "CuPy reference"
    else:
        label = " + ".join(dict.fromkeys(f"C++ {n}" for n, _ in calls)) or "NumPy reference"
    e.kernel_labels = [label]


# ---- the table ---------------------------------------------------------------------------
_SORT_KEYS = ("self_cpu_time_total", "cpu_time_total", "cpu_time", "count",
              "dispatch_time_total", "kernel_time_total", "self_cuda_time_total",
              "cuda_time_total", "cuda_time", "self_device_time_total", "device_time_total")


def _fmt_time(us):
    if us >= 1e6:
        return f"{us / 1e6:.3f}s"
    if us >= 1e3:
        return f"{us / 1e3:.3f}ms"
    return f"{us:.3f}us"


def _fmt_pct(x):
    return f"{100 * x:.2f}%"


def _clip(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


def _table(rows, sort_by, row_limit, name_width, kernel_width, header, grouped):
    if sort_by is not None:
        if sort_by not in _SORT_KEYS:
            raise ValueError(f"table(sort_by={sort_by!r}): choose from {', '.join(_SORT_KEYS)}")
        rows = sorted(rows, key=lambda r: getattr(r, sort_by), reverse=True)
    self_total = sum(r.self_cpu_time_total for r in rows)
    cuda = any(r.has_cuda for r in rows)
    cuda_total = sum(r.self_cuda_time_total for r in rows)
    if row_limit is not None and row_limit > 0:
        rows = rows[:row_limit]
    pct = (lambda v: _fmt_pct(v / self_total)) if self_total > 0 else (lambda v: "--")
    cols = [("Name", "<"), ("Self CPU %", ">"), ("Self CPU", ">"), ("CPU total %", ">"),
            ("CPU total", ">"), ("CPU time avg", ">"), ("Dispatch", ">"), ("Kernel", ">")]
    if cuda:
        cols += [("Self CUDA", ">"), ("Self CUDA %", ">"), ("CUDA total", ">"),
                 ("CUDA time avg", ">")]
    cols += [("# of Calls", ">"), ("Device", "<"), ("Kernel that ran", "<")]
    if grouped:
        cols.append(("Input Shapes", "<"))
    body = []
    for r in rows:
        line = [_clip(r.key, name_width), pct(r.self_cpu_time_total),
                _fmt_time(r.self_cpu_time_total), pct(r.cpu_time_total),
                _fmt_time(r.cpu_time_total), _fmt_time(r.cpu_time),
                _fmt_time(r.dispatch_time_total), _fmt_time(r.kernel_time_total)]
        if cuda:
            line += [_fmt_time(r.self_cuda_time_total),
                     _fmt_pct(r.self_cuda_time_total / cuda_total) if cuda_total else "--",
                     _fmt_time(r.cuda_time_total), _fmt_time(r.cuda_time)]
        line += [str(r.count), r.device, _clip(r.kernel, kernel_width)]
        if grouped:
            line.append(str([list(s) if s is not None else [] for s in (r.input_shapes or ())]))
        body.append(line)
    widths = [max([len(c[0])] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
    sep = "  ".join("-" * w for w in widths)

    def fmt(cells):
        return "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, cols, widths)).rstrip()
    out = [] if header is None else [header]
    out += [sep, fmt([c[0] for c in cols]), sep] + [fmt(b) for b in body] + [sep]
    out.append(f"Self CPU time total: {_fmt_time(self_total)}")
    if cuda:
        out.append(f"Self CUDA time total: {_fmt_time(cuda_total)}")
    if any("emulated" in r.device for r in rows):
        out.append("cuda (emulated): the CUDA kernels ran on the CPU emulator; its times are "
                   "not GPU times")
    return "\n".join(out) + "\n"


# ---- files ----------------------------------------------------------------------------------
def _write_atomic(path, data):
    """``data`` (bytes or str) to ``path`` through a temporary file and os.replace."""
    if isinstance(data, str):
        data = data.encode()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TrainingProfile:
    """``gpudiff train --profile N``: after ``warmup`` steps, profile ``steps`` training steps
    and write ``profile.txt`` (the table, sorted by self CPU time) and ``trace.json`` into
    ``out``, each step a ``ProfilerStep#k`` range.

    The loop calls ``step()`` after every training step, ``pause()`` when an epoch's steps
    end (before evaluation: a window of finished steps is written, one with none is dropped
    and starts again after the next step) and ``close()`` when training ends."""

    def __init__(self, out, steps, warmup=1, log=print, sort_by="self_cpu_time_total"):
        self.out, self.steps, self.warmup, self.log = out, int(steps), int(warmup), log
        self.sort_by = sort_by
        self.seen, self.prof, self.paths = 0, None, None

    def step(self):
        if self.paths is not None:
            return
        self.seen += 1
        if self.prof is None:
            if self.seen >= self.warmup:
                self.prof = profile(record_shapes=True).start()
            return
        self.prof.step()
        if self.prof.step_num >= self.steps:
            self._write()

    def pause(self):
        if self.paths is None and self.prof is not None:
            if self.prof.step_num > 0:
                self._write()
            else:
                self.prof.stop()
                self.prof = None

    def close(self):
        self.pause()
        if self.paths is None:
            self.log(f"--profile: no training step was profiled (the run had {self.seen} "
                     f"step(s); the first {self.warmup} warm up)")
        return self.paths

    def _write(self):
        prof = self.prof.stop()
        n = prof.step_num
        table = prof.key_averages().table(
            sort_by=self.sort_by, row_limit=60,
            header=f"gpudiff train --profile: {n} training step(s) after {self.warmup} "
                   f"warm-up step(s)")
        txt = os.path.join(self.out, "profile.txt")
        trace = os.path.join(self.out, "trace.json")
        _write_atomic(txt, table)
        prof.export_chrome_trace(trace)
        self.paths = (txt, trace)
        self.log(f"profiled {n} training step(s): table in {txt}, trace in {trace} (open it "
                 f"in ui.perfetto.dev or chrome://tracing)")
