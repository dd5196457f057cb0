"""gpudiff.cuda's CUDA-graphs and streams API (PyTorch's names): CUDAGraph, graph,
make_graphed_callables, Stream, Event, current_stream, stream, graph_pool_handle.

On a GPU a CUDAGraph is CuPy's stream capture replayed by one graph launch; on the emulated
device it is the device-agnostic plan of ``gpudiff.Graph`` (each replayed step launches the
emulator's kernels), so CI runs every graph test. docs/GRAPHS.md.
"""
import contextlib

from .. import graphs as _graphs
from .. import runtime
from ..runtime import capture as _capture
from ..runtime.capture import Event, Stream, current_stream, default_stream  # noqa: F401

graph_pool_handle = _graphs.graph_pool_handle


class CUDAGraph(_graphs.Graph):
    """PyTorch's ``torch.cuda.CUDAGraph``: capture_begin / capture_end / replay / reset /
    pool. Kernels run on replay only; the step's tensors keep their memory."""

    def __init__(self, keep_graph=False):
        if runtime.cuda_mode() is None:
            raise RuntimeError("CUDAGraph: CUDA is not available (no GPU, and GPUDIFF_CUDA is "
                               "not 'emulate'); use gpudiff.Graph() for a CPU capture")
        super().__init__()
        self._gpu = None

    def _new_plan(self):
        # a real GPU records kernels itself: the plan only watches for errors
        return _capture.Plan(record=runtime.cuda_mode() != "gpu")

    def capture_begin(self, pool=None, capture_error_mode="global"):
        super().capture_begin(pool, capture_error_mode)
        if runtime.cuda_mode() == "gpu":
            self._gpu = _capture.GpuCapture(self._pool, _stream_for_capture())
            try:
                self._gpu.begin()
            except BaseException:
                self._capturing = False
                _capture.finish(self._plan)
                self._plan = None
                raise

    def capture_end(self):
        if self._gpu is not None and self._capturing:
            self._gpu.end()
        super().capture_end()

    def replay(self):
        if self._gpu is not None:
            if self._gpu.graph is None:
                raise _capture.CaptureError("replay: this graph has no capture to replay")
            super().replay()  # (checks the static tensors; the plan has no steps)
            self._gpu.launch()
            return
        super().replay()

    def reset(self):
        super().reset()
        self._gpu = None


def _stream_for_capture():
    s = current_stream()
    return s if s is not default_stream() else Stream()  # never capture the legacy stream


class graph(_graphs.graph):
    """``with gpudiff.cuda.graph(g, pool=None, stream=None):`` (PyTorch's torch.cuda.graph)."""

    def __enter__(self):
        runtime_sync()
        return super().__enter__()


def runtime_sync():
    if runtime.cuda_mode() == "gpu":
        runtime._cupy.cuda.Device().synchronize()


def make_graphed_callables(callables, sample_args, num_warmup_iters=3,
                           allow_unused_input=False, pool=None):
    return _graphs.make_graphed_callables(callables, sample_args, num_warmup_iters,
                                          allow_unused_input, pool, graph_type=CUDAGraph)


@contextlib.contextmanager
def stream(s):
    """``with gpudiff.cuda.stream(s):`` makes ``s`` current (None: a no-op)."""
    if s is None:
        yield
        return
    with s:
        yield


def is_current_stream_capturing():
    return _capture.active is not None
