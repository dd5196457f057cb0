"""The real-GPU CUDAGraph path (runtime/capture.py GpuCapture, cuda/graphs.py) driven against a
stand-in for CuPy's stream-capture API, so that its call sequence runs in CI: the private
pool is the allocator only while capturing (and is restored when begin_capture fails), the
capture runs on a side stream, replay runs the pre-replay hooks (a capturable optimizer's
device scalars) before the one graph launch, on the current stream. What CuPy itself does
with the graph is not tested here: not yet run on a GPU."""
import types

import pytest

import gpudiff
from gpudiff import runtime
from gpudiff.runtime import capture


class _Log(list):
    def add(self, *what):
        self.append(what)


def _fake_cupy(log, fail_begin=False):
    class MemoryPool:
        def malloc(self, n):  # pragma: no cover (never called: no kernels run)
            raise AssertionError

    class Graph:
        def launch(self, stream):
            log.add("launch", stream)

    class Stream:
        def __init__(self, non_blocking=False, null=False):
            self.name = "null" if null else "side"

        def begin_capture(self, mode=None):
            log.add("begin_capture", self.name, mode)
            if fail_begin:
                raise RuntimeError("cudaStreamBeginCapture failed (stand-in)")

        def end_capture(self):
            log.add("end_capture", self.name)
            return Graph()

        def __enter__(self):
            log.add("enter", self.name)
            return self

        def __exit__(self, *exc):
            log.add("exit", self.name)

        def record(self):
            return None

        def wait_event(self, e):
            pass

    state = {"alloc": "default"}
    cuda = types.SimpleNamespace(
        MemoryPool=MemoryPool, Stream=Stream,
        get_allocator=lambda: state["alloc"],
        set_allocator=lambda a: (state.__setitem__("alloc", a), log.add("allocator", a)),
        get_current_stream=lambda: Stream(null=True),
        runtime=types.SimpleNamespace(streamCaptureModeRelaxed=2),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None))
    return types.SimpleNamespace(cuda=cuda), state


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(fail_begin=False):
        log = _Log()
        cp, state = _fake_cupy(log, fail_begin)
        monkeypatch.setattr(capture, "_cp", lambda: cp)
        monkeypatch.setattr(runtime, "cuda_mode", lambda: "gpu")
        monkeypatch.setattr(runtime, "_cupy", cp)
        monkeypatch.setattr(capture, "_default_stream", None)
        monkeypatch.setattr(capture, "_stream_stack", [])
        return log, state
    yield install


def test_capture_and_replay_call_sequence(fake_gpu):
    log, state = fake_gpu()
    from gpudiff.cuda import CUDAGraph
    g = CUDAGraph()
    x = gpudiff.ones(3, requires_grad=True)      # (host tensors: the ops run, the plan
    order = []                                   #  records nothing, as on a GPU)
    g.capture_begin()
    assert state["alloc"] != "default"           # the graph's private pool allocates
    g._plan.pre_replay.append(lambda: order.append("pre_replay"))
    y = (x * 2).sum()
    g.capture_end()
    assert state["alloc"] == "default"           # and only during the capture
    assert not g._plan.steps                     # a GPU graph replays kernels, not steps
    kinds = [e[0] for e in log]
    assert kinds.index("enter") < kinds.index("begin_capture") < kinds.index("end_capture") \
        < kinds.index("exit")
    assert ("begin_capture", "side", 2) in log   # a side stream, relaxed mode
    log.clear()
    g.replay()
    order.append("after")
    assert [e[0] for e in log] == ["launch"] and order == ["pre_replay", "after"]
    assert log[0][1].name == "null"              # launched on the current stream
    g.reset()
    with pytest.raises(capture.CaptureError, match="no capture to replay"):
        g.replay()
    assert y.shape == ()


def test_a_failed_begin_capture_restores_the_allocator_and_leaves_no_capture(fake_gpu):
    log, state = fake_gpu(fail_begin=True)
    from gpudiff.cuda import CUDAGraph
    g = CUDAGraph()
    with pytest.raises(RuntimeError, match="BeginCapture failed"):
        g.capture_begin()
    assert state["alloc"] == "default" and capture.active is None
    assert ("exit", "side") in log
    g2 = gpudiff.Graph()                         # no capture left open: a new one starts
    with gpudiff.graph(g2):
        gpudiff.ones(2) * 3
