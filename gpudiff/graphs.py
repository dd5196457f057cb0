"""Whole-step capture and replay, PyTorch's CUDA-graphs API on every device (docs/GRAPHS.md).

    g = gpudiff.Graph()                      # gpudiff.cuda.CUDAGraph() on a GPU
    with gpudiff.graph(g):                   # records; runs nothing that changes state
        loss = loss_fn(model(static_x), static_y)
        loss.backward()
        optimizer.step()
    for x, y in data:
        static_x.copy_(x); static_y.copy_(y)
        g.replay()                           # the whole step, no dispatch, no tape

``Graph`` records the step as a plan of array-level steps (gpudiff/runtime/capture.py) and
replays it on the CPU, on the emulated cuda device and on a GPU alike;
``gpudiff.cuda.CUDAGraph`` (gpudiff/cuda/graphs.py) is a real CUDA graph on a GPU.
"""
import gc
import itertools

from .autograd.function import Function
from .runtime import capture
from .tensor import Tensor

_pool_ids = itertools.count(1)


def graph_pool_handle():
    """An opaque token naming a memory pool that several graphs may share (``pool=``)."""
    return (0, next(_pool_ids))


class Graph:
    """A captured step: ``capture_begin()``/``capture_end()`` (or ``with graph(g):``) record
    it, ``replay()`` runs it again on the same memory, ``reset()`` drops it."""

    def __init__(self, keep_graph=False):  # (keep_graph: PyTorch's; a plan is always kept)
        self._plan = None
        self._capturing = False
        self._pool = None

    def _new_plan(self):
        return capture.Plan(record=True)

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if self._capturing:
            raise capture.CaptureError("capture_begin: this graph is already capturing")
        if self._plan is not None:
            raise capture.CaptureError("capture_begin: this graph already holds a capture; "
                                       "call reset() before capturing again")
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError(f"capture_begin: capture_error_mode must be 'global', "
                             f"'thread_local' or 'relaxed', got {capture_error_mode!r}")
        plan = self._new_plan()
        capture.begin(plan)  # raises on a nested capture
        self._plan, self._capturing = plan, True
        self._pool = pool if pool is not None else graph_pool_handle()

    def capture_end(self):
        if not self._capturing:
            raise capture.CaptureError("capture_end: capture_begin() was not called")
        self._capturing = False
        try:
            capture.finish(self._plan)
        except BaseException:
            self._plan = None
            raise
        # tensors made and dropped during the capture are not statics a replay must check
        self._plan.statics = [s for s in self._plan.statics if s[0]() is not None]

    def replay(self):
        plan = self._plan
        if plan is None or self._capturing:
            raise capture.CaptureError(
                "replay: this graph has no capture to replay" if plan is None else
                "replay: the graph is still being captured (call capture_end() first)")
        for ref, array, shape in plan.statics:
            t = ref()
            if t is None:
                raise capture.CaptureError(
                    f"replay: a static tensor of shape {tuple(shape)} that the captured graph "
                    f"reads was freed after the capture; keep a reference to every tensor the "
                    f"graph uses (e.g. the static input) for as long as you replay it")
            if t.array is not array:
                raise capture.CaptureError(
                    f"replay: a static tensor of shape {tuple(shape)} that the captured graph "
                    f"reads now holds other memory (shape {tuple(t.shape)}): it was resized or "
                    f"reassigned (.data = ..., set_) after the capture. Write new values into "
                    f"it with copy_() instead")
        plan.replay()

    def reset(self):
        if self._capturing:
            raise capture.CaptureError("reset: the graph is being captured")
        self._plan = None

    def pool(self):
        """The memory-pool token of this graph (pass it as ``pool=`` to share it)."""
        if self._pool is None:
            self._pool = graph_pool_handle()
        return self._pool

    def enable_debug_mode(self):
        pass

    def debug_dump(self, path):
        with open(path, "w") as f:
            for i, step in enumerate(self._plan.steps if self._plan else ()):
                f.write(f"{i} {getattr(step, '__qualname__', step)}\n")

    @property
    def num_steps(self):
        """How many steps the captured plan replays (0 on a real CUDA graph)."""
        return len(self._plan.steps) if self._plan is not None else 0


class graph:
    """``with graph(g, pool=None, stream=None):`` captures the block into ``g`` (PyTorch's
    ``torch.cuda.graph``)."""

    default_capture_stream = None

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.graph = cuda_graph
        self.pool = pool
        self.stream = stream
        self.capture_error_mode = capture_error_mode
        self._stream_ctx = None

    def __enter__(self):
        gc.collect()  # as PyTorch: free what garbage holds before the capture
        if self.stream is not None and hasattr(self.stream, "__enter__"):
            self._stream_ctx = self.stream
            self._stream_ctx.__enter__()
        self.graph.capture_begin(pool=self.pool, capture_error_mode=self.capture_error_mode)
        return None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and self.graph._capturing:
                self.graph._capturing = False
                try:
                    capture.finish(self.graph._plan)
                finally:
                    self.graph._plan = None
                return False
            self.graph.capture_end()
        finally:
            if self._stream_ctx is not None:
                self._stream_ctx.__exit__(exc_type, exc, tb)
        return False


# ---- make_graphed_callables -----------------------------------------------------------------
def make_graphed_callables(callables, sample_args, num_warmup_iters=3,
                           allow_unused_input=False, pool=None, graph_type=Graph):
    """Graphed versions of ``callables`` (modules or functions): the forward and the backward
    are each captured once from ``sample_args`` and replayed on every call (PyTorch's
    ``torch.cuda.make_graphed_callables``). Arguments must have the sample's shapes."""
    single = not isinstance(callables, tuple)
    if single:
        callables, sample_args = (callables,), (sample_args,)
    out = []
    for fn, args in zip(callables, sample_args):
        if not isinstance(args, tuple):
            args = (args,)
        out.append(_graph_one(fn, args, num_warmup_iters, allow_unused_input, pool,
                              graph_type))
    return out[0] if single else tuple(out)


def _graph_one(fn, args, warmup, allow_unused, pool, graph_type):
    from .autograd import graph as _tape  # (layer 1: grad())
    for a in args:
        if not isinstance(a, Tensor):
            raise TypeError("make_graphed_callables: sample_args must be tensors")
    params = [p for p in fn.parameters() if p.requires_grad] if hasattr(fn, "parameters") \
        else []
    static_in = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    diff_in = [a for a in static_in if a.requires_grad] + params
    for _ in range(warmup):  # as PyTorch: let lazy state appear before the capture
        outs = _as_tuple(fn(*static_in))
        if diff_in:
            _tape.grad([o for o in outs if o.requires_grad],
                       diff_in, [o.new_ones(o.shape) for o in outs if o.requires_grad],
                       allow_unused=True)
    fwd, bwd = graph_type(), graph_type()
    with graph(fwd, pool=pool):
        static_out = _as_tuple(fn(*static_in))
    diff_out = [o for o in static_out if o.requires_grad]
    static_gout = [o.new_zeros(o.shape) for o in diff_out]
    with graph(bwd, pool=fwd.pool()):
        static_gin = _tape.grad(diff_out, diff_in, static_gout, allow_unused=allow_unused) \
            if diff_in and diff_out else ()
    n_in = len(args)

    class Graphed(Function):
        @staticmethod
        def forward(ctx, *inputs):
            for s, x in zip(static_in, inputs[:n_in]):
                if s.shape != x.shape:
                    raise RuntimeError(f"graphed callable: got an input of shape "
                                       f"{tuple(x.shape)}; it was captured for "
                                       f"{tuple(s.shape)}")
                s.copy_(x)
            fwd.replay()
            return tuple(o.detach().clone() for o in static_out)

        @staticmethod
        def backward(ctx, *gouts):
            k = 0
            for o, g in zip(static_out, gouts):
                if o.requires_grad:
                    if g is None:
                        static_gout[k].zero_()
                    else:
                        static_gout[k].copy_(g)
                    k += 1
            bwd.replay()
            grads = iter(static_gin)
            res = []
            for a in static_in:
                res.append(next(grads).detach().clone() if a.requires_grad else None)
            for _p in params:
                g = next(grads)
                res.append(None if g is None else g.detach().clone())
            return tuple(res)

    def graphed(*inputs):
        outs = Graphed.apply(*inputs, *params)
        return outs[0] if len(outs) == 1 else outs

    if hasattr(fn, "forward"):
        fn.forward = graphed
        return fn
    return graphed


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


__all__ = ["Graph", "graph", "make_graphed_callables", "graph_pool_handle"]
