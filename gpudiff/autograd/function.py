"""The one recording path: a context (``FunctionCtx``) and ``record``, used by the built-in ops
(gpudiff/ops/__init__.py ``apply``) and by custom ``Function``s alike.

    class Square(Function):
        @staticmethod
        def forward(ctx, x):               # Tensors in (run under no_grad), Tensors out
            ctx.save_for_backward(x)
            return x * x
        @staticmethod
        def backward(ctx, gy):             # Tensors in, Tensors out (double backward works)
            x, = ctx.saved_tensors
            return 2 * x * gy

    y = Square.apply(x)

A built-in op's forward gets raw arrays and saves arrays; a custom Function's forward gets
Tensors and saves Tensors. ``record`` resolves either against the op's inputs and outputs:
what is saved keeps its graph link and the version it had (an in-place change before
backward raises).

``ctx.mark_dirty(x)`` (as in PyTorch): the forward changed input ``x`` in place and returns
``x`` itself. Its version counter is bumped (views and saved tensors of the old value then
raise on use) and its history is rebased onto this node.
"""
from .. import runtime
from . import graph
from .grad_mode import is_grad_enabled, no_grad
from .graph import Node, SavedTensor


class FunctionCtx:
    """What a forward hands its backward: saved tensors and any attributes it sets."""

    # the engine's fields are slots (the C dispatch path, csrc/cpu/dispatch.cpp, writes and
    # reads them at their offsets); an op's own attributes (ctx.slope, ...) go in __dict__
    __slots__ = ("needs_input_grad", "device", "op_name", "op", "materialize_grads",
                 "input_meta", "out_device", "_to_save", "_saved", "_non_diff", "_dirty",
                 "__dict__", "__weakref__")

    def __init__(self, needs_input_grad, device=None, name=""):
        self.needs_input_grad = needs_input_grad
        self.device = device
        self.op_name = name
        self.op = None
        self.materialize_grads = True
        self.input_meta = ()     # (shape, dtype) of each input: the engine checks gradients
        self.out_device = None   # an op whose outputs live elsewhere (to_device) sets it
        self._to_save = ()       # what save_for_backward got, until record() resolves it
        self._saved = None       # SavedTensors; None once freed (or before recording)
        self._non_diff = ()
        self._dirty = ()

    @property
    def xp(self):
        """The array module of the op's device (numpy or cupy)."""
        return self.device.xp

    def kernel(self, name):
        """This device's fast kernel ``name``, or None (use the reference code)."""
        return runtime.kernel(self.device, name)

    def save_for_backward(self, *values):
        """Keep inputs or outputs (arrays in a built-in op, Tensors in a Function)."""
        self._to_save = values

    def mark_non_differentiable(self, *outputs):
        self._non_diff = outputs

    def mark_dirty(self, *tensors):
        """The forward modified these inputs in place (and returns them as outputs)."""
        self._dirty = tensors

    def set_materialize_grads(self, value):
        self.materialize_grads = bool(value)

    @property
    def saved_tensors(self):
        if self._saved is None:
            raise RuntimeError(
                f"Trying to backward through '{self.op_name}' a second time, or to use its saved "
                f"tensors after they were freed: specify retain_graph=True on the first "
                f"backward() call if you need to backward through the graph again.")
        return tuple(None if s is None else s.unpack(self.op_name) for s in self._saved)

    @property
    def saved_arrays(self):
        """What was saved, as raw arrays (for an op's ``backward_arrays``)."""
        if self._saved is None:
            self.saved_tensors  # raises the freed-graph error
        return tuple(None if s is None else s.unpack_array(self.op_name) for s in self._saved)

    def release(self):
        self._saved = None


def _is(value, t):
    """Whether ``value`` (a Tensor or an array) is Tensor ``t`` or ``t``'s array."""
    return value is t or value is t.array


def _save(value, inputs, outputs, node, dirty):
    """Wrap a saved value: an input or output keeps its graph link and version check (an input
    the forward changed in place counts as the output it became)."""
    if value is None:
        return None
    if not any(value is d for d in dirty):
        for t in inputs:
            if t is not None and _is(value, t):
                return SavedTensor(t.array, t.device, tensor=t)
    for i, t in enumerate(outputs):
        if t is not None and _is(value, t):
            return SavedTensor(t.array, t.device, tensor=t, grad_fn=t.grad_fn, output_nr=i,
                               owner=node)
    if isinstance(value, graph.Tensor):  # neither: a constant as far as double backward goes
        return SavedTensor(value.array, value.device, tensor=value.detach())
    return SavedTensor(value, outputs[0].device)


def record(ctx, backward_fn, inputs, outputs, backward_arrays=None):
    """Put one op on the tape: a Node (backward ``backward_fn(ctx, *gys)``) whose outputs are
    the differentiable ones of ``outputs``. Inputs' edges are taken before dirty inputs are
    rebased onto the node."""
    ctx.input_meta = [None if t is None else (t.shape, t.dtype) for t in inputs]
    node = Node(ctx.op_name, backward_fn, ctx, inputs, outputs, backward_arrays)
    non_diff = ctx._non_diff
    for i, r in enumerate(outputs):
        if r is None or (r.array.dtype.kind != "f" and r.array.dtype != runtime.bfloat16):
            continue
        if non_diff and any(v is r or v is r.array for v in non_diff):
            continue
        r.grad_fn, r._output_nr, r._requires_grad = node, i, True
    to_save = ctx._to_save
    ctx._saved = tuple(_save(v, inputs, outputs, node, ctx._dirty) for v in to_save) \
        if to_save else ()
    ctx._to_save = ()
    return node


def refresh_saved(node, saved, new_outputs, out_arrays):
    """A captured graph's replay reran ``node``'s forward into ``node.ctx``, and copied its
    outputs ``new_outputs`` into ``out_arrays`` (the captured outputs' arrays): point the
    capture's SavedTensors ``saved`` at what this forward saved, with the version counts of
    now (runtime/capture.py)."""
    ctx = node.ctx
    for s, v in zip(saved, ctx._to_save):
        if s is not None:
            for n, b in zip(new_outputs, out_arrays):
                if v is n:
                    v = b
                    break
            s.array = v
            if s.version is not None:
                s.saved_version = s.version[0]
    ctx._saved = saved
    node.freed = False


def check_inplace(name, t):
    """A tensor about to be written in place while recording: not a leaf that requires grad
    (its .grad would mean nothing), not a view (its base would keep a stale graph)."""
    if t.grad_fn is None and t.requires_grad:
        raise RuntimeError(f"{name}: a leaf Variable that requires grad is being used in an "
                           f"in-place operation (wrap it in gpudiff.no_grad(), or clone it)")
    if t._base is not None:
        raise RuntimeError(f"{name}: in-place operation with autograd on a view (shape "
                           f"{tuple(t.shape)}) of another tensor is not supported: its base "
                           f"would keep a stale graph. Use an out-of-place op, or clone() the "
                           f"view first.")


class Function:
    """Subclass with static ``forward(ctx, *args)`` and ``backward(ctx, *grads)``."""

    @classmethod
    def apply(cls, *args, **kwargs):
        Tensor = graph.Tensor
        inputs = [a if isinstance(a, Tensor) else None for a in args]
        tensors = [t for t in inputs if t is not None]
        dev = tensors[0].device if tensors else None
        ctx = FunctionCtx(tuple(t is not None and t.requires_grad for t in inputs), dev,
                          cls.__name__)
        with no_grad():
            out = cls.forward(ctx, *args, **kwargs)
        multi = isinstance(out, tuple)
        outs = out if multi else (out,)
        recording = is_grad_enabled() and any(t.requires_grad for t in tensors)
        dirty = ctx._dirty
        for d in dirty:
            if not any(d is t for t in tensors):
                raise RuntimeError(f"{cls.__name__}: mark_dirty() got a tensor that is not an "
                                   f"input of forward()")
            if not any(d is o for o in outs):
                raise RuntimeError(f"{cls.__name__}: an input marked dirty in forward() must "
                                   f"be returned as an output")
            if recording:
                check_inplace(cls.__name__, d)
            d._version[0] += 1   # saved tensors and views of the old value now raise
        if recording:
            # an input returned unchanged is a new tensor sharing its memory, so the input
            # keeps its own graph; a dirty input is returned itself and rebased onto the node
            outs = tuple(Tensor._make(o.array, o.device) if isinstance(o, Tensor) and
                         any(o is t for t in tensors) and not any(o is d for d in dirty)
                         else o for o in outs)
            record(ctx, _call_backward(cls.backward), inputs,
                   [o if isinstance(o, Tensor) else None for o in outs])
        ctx._to_save = ()
        return outs if multi else outs[0]

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError


def _call_backward(backward):
    def backward_fn(ctx, *gys):
        grads = backward(ctx, *gys)
        return grads if isinstance(grads, tuple) else (grads,)
    return backward_fn
