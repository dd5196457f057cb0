"""The registry of primitive ops. An op and its gradient are one short block:

    class exp(Op):
        def forward(ctx, x):              # raw arrays of ctx.xp (numpy or cupy) in and out
            y = ctx.xp.exp(x)
            ctx.save_for_backward(y)      # save inputs/outputs themselves (not copies):
            return y                      #   they come back as graph-connected Tensors
        def backward(ctx, gy):            # Tensors in, Tensors out, written in gpudiff ops,
            y, = ctx.saved_tensors        #   so double backward works (create_graph=True)
            return gy * y
        def backward_arrays(ctx, gy):     # optional, for hot ops: the same on raw arrays,
            y, = ctx.saved_arrays         #   run by a plain backward (no graph to build)
            return gy * y

Tensor arguments are positional (None allowed, e.g. a missing bias); everything else is a
keyword-only parameter. ``exp.apply(t)`` runs it: it checks devices, runs ``forward`` on the
inputs' arrays, wraps the outputs and, if grad mode is on and an input requires grad,
records a Node on the tape. A forward may use a fast kernel: ``k = ctx.kernel('softmax')``
returns the device's compiled kernel or None (use the reference then).

Rules: a forward returns fresh arrays or views of its inputs (views only for shape ops that
declare ``view = True``); arrays saved with save_for_backward should be inputs or outputs
(anything else is treated as a constant in double backward); integer outputs are never
differentiable.
"""
import inspect
import weakref as _weakref_mod
from time import perf_counter_ns

import numpy as np

from .. import runtime

from ..autograd.function import FunctionCtx, record, refresh_saved
from ..autograd.grad_mode import is_anomaly_enabled, is_grad_enabled
from ..runtime import autocast, capture, events
from ..runtime.dtypes import LOW_FLOATS, is_floating
from ..runtime.kernels import kernel as _kernel
from ..tensor import Tensor

REGISTRY: dict[str, type] = {}
_weakref = _weakref_mod.ref


class Op:
    """Base of every primitive op; subclasses register themselves by class name."""

    name = None
    differentiable = True
    backward_arrays = None  # optional: backward on raw arrays (used when no graph is built)
    view = False  # outputs share memory (and the version counter) with input 0
    writes = ()  # names of inputs the forward updates in place (batch norm's running stats)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = cls.name or cls.__name__
        if cls.name in REGISTRY:
            raise RuntimeError(f"op {cls.name!r} registered twice")
        REGISTRY[cls.name] = cls
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        cls.arg_names = tuple(p.name for p in params
                              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    @staticmethod
    def forward(ctx, *args, **params):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *gys):
        raise NotImplementedError

    @classmethod
    def apply(cls, *tensors, **params):
        return apply(cls, tensors, params)


def _device_of(op, tensors):
    dev = None
    for t in tensors:  # fast path: every tensor on the same Device object
        if t is not None:
            if dev is None:
                dev = t.device
            elif t.device is not dev:
                break
    else:
        return dev
    dev, first = None, None
    for name, t in zip(op.arg_names or ("input",) * len(tensors), tensors):
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise RuntimeError(
                f"{op.name}: expected all tensors to be on the same device, but found at least "
                f"two devices, {dev} (argument '{first}') and {t.device} (argument '{name}')")
    return dev


def apply(op, tensors, params):
    if autocast.state is not None:  # an autocast region: cast the inputs by op's policy
        tensors = autocast.cast(op, tensors)  # (casts are ops: a capture records them first)
    if capture.active is not None and capture.active.depth == 0:
        return _apply_captured(capture.active, op, tensors, params)
    listener = events.listener  # a profiler: it gets this op's total and forward times
    if listener is not None:
        t0 = perf_counter_ns()
        listener.op_begin(op.name, tensors)
    dev = _device_of(op, tensors)
    if dev is None:
        raise TypeError(f"{op.name}: expected at least one tensor argument")
    needs_grad = tuple(t is not None and t._requires_grad for t in tensors)
    recording = op.differentiable and True in needs_grad and is_grad_enabled()
    if recording:
        _check_views(op, tensors)
    ctx = FunctionCtx(needs_grad, dev, op.name)
    ctx.op = op
    arrays = [None if t is None else t.array for t in tensors]
    if listener is not None:
        f0 = perf_counter_ns()
    host = dev.host  # NumPy arrays: the CPU, or the emulated CUDA device
    if host:
        out = op.forward(ctx, *arrays, **params)
    else:
        with runtime.on_device(dev):  # CuPy allocates on the current GPU
            out = op.forward(ctx, *arrays, **params)
    if listener is not None:
        f1 = perf_counter_ns()
    multi = isinstance(out, tuple)
    outs = out if multi else (out,)
    out_dev = ctx.out_device or dev
    if host:
        if (type(out) is not np.ndarray) if not multi else \
                any(type(o) is not np.ndarray for o in outs):
            outs = _as_ndarrays(ctx, outs)
        if out_dev.type == "cuda":  # what the forward made with ndarray methods and operators
            runtime.emulated.own(outs)  # is device memory too (the emulated pool's blocks)
    if is_anomaly_enabled():
        for i, o in enumerate(outs):
            if is_floating(o.dtype) and not bool(dev.xp.isfinite(o).all()):
                raise RuntimeError(f"Function '{op.name}' returned nan/inf values in its "
                                   f"{i}th output (forward)")
    results = [Tensor._make(o, out_dev) for o in outs]
    if op.view:  # views share their base's version counter: in-place changes show through
        src = tensors[0]
        root = src if src._base is None else src._base
        for r in results:
            if dev.xp.may_share_memory(r.array, src.array):  # (advanced indexing copies)
                r._version = src._version
                r._base, r._base_fn = root, root.grad_fn
    if recording:
        record(ctx, op.backward, tensors, results, op.backward_arrays)
    ctx._to_save = ()
    if listener is not None:
        listener.op(op.name, dev, t0, f0, f1, perf_counter_ns(),
                    [None if t is None else t.shape for t in tensors])
    return tuple(results) if multi else results[0]


def _apply_captured(plan, op, tensors, params):
    """``apply`` while a graph is captured: run the op once as usual, and add to the plan a
    step that reruns its forward on the same input arrays, writes the outputs into the
    arrays the results hold (the capture's static memory) and refreshes what the recorded
    node saved, so the captured backward sees this replay's values
    (runtime/capture.py)."""
    arrays = [None if t is None else t.array for t in tensors]
    for name in op.writes:  # capture must leave the running statistics as they were
        plan.will_write(arrays[op.arg_names.index(name)])
    for t in tensors:
        if t is not None:
            plan.static(t, _weakref)
    results = plan.run(apply, op, tensors, params)
    if not plan.record:
        return results
    multi = isinstance(results, tuple)
    outs = results if multi else (results,)
    plan.made(outs)
    bufs = [r.array for r in outs]
    node = next((r.grad_fn for r in outs if r.grad_fn is not None), None)
    dev, view, xp = outs[0].device, op.view, outs[0].device.xp
    if node is not None:  # the replayed forward fills the node's own context again
        ctx, saved = node.ctx, node.ctx._saved
    else:
        ctx = FunctionCtx(tuple(t is not None and t._requires_grad for t in tensors), dev,
                          op.name)
        ctx.op = op

    forward = op.forward  # without the float16/bfloat16 wrapper when no input needs it
    if getattr(forward, "__wrapped__", None) is not None and not any(
            a is not None and getattr(a, "dtype", None) in LOW_FLOATS for a in arrays):
        forward = forward.__wrapped__

    if multi or view:
        def step():
            new = forward(ctx, *arrays, **params)
            new = new if multi else (new,)
            for b, n in zip(bufs, new):
                if n is not b and not (view and xp.may_share_memory(b, n)):
                    b[...] = n
            if node is not None:
                refresh_saved(node, saved, new, bufs)
            ctx._to_save = ()
    else:  # (the common case: one fresh output)
        buf = bufs[0]

        def step():
            new = forward(ctx, *arrays, **params)
            buf[...] = new
            if node is not None:
                refresh_saved(node, saved, (new,), bufs)
            ctx._to_save = ()
    plan.add(step)
    return results


def _as_ndarrays(ctx, outs):
    """NumPy ufuncs on 0-d arrays return scalars (np.float32, ...): make them 0-d arrays, and
    point what the forward saved or marked at the new arrays (identity links saved outputs)."""
    new = tuple(o if type(o) is np.ndarray else np.asarray(o) for o in outs)
    swap = {id(o): n for o, n in zip(outs, new) if o is not n}
    ctx._to_save = tuple(swap.get(id(a), a) for a in ctx._to_save)
    ctx._non_diff = tuple(swap.get(id(a), a) for a in ctx._non_diff)
    return new


def _check_views(op, tensors):
    """A view whose base was since changed in place with autograd holds the new values but
    the old graph: its gradients would be silently wrong, so using it raises."""
    for t in tensors:
        if t is not None and t._base is not None and t.requires_grad \
                and t._base.grad_fn is not t._base_fn:
            raise RuntimeError(
                f"{op.name}: an input is a view of a tensor that was modified by an in-place "
                f"operation after the view was taken; its gradient would be wrong. Take the "
                f"view after the in-place operation (or use an out-of-place op).")


def forward_of(op, ctx, *arrays, **params):
    """``op``'s forward on raw arrays, on ``ctx``'s device, outside the tape: what an op's
    ``backward_arrays`` calls where its backward formula applies that op."""
    return op.forward(FunctionCtx(None, ctx.device, op.name), *arrays, **params)


def run_kernel(ctx, name, *args):
    """The device's fast kernel ``name`` on ``args``, or None: no kernel, or one that declined
    (a dtype or layout it does not handle). The op then runs its reference code. 0-d arrays
    never go to a kernel (no speed to gain, and kernels may assume ndim >= 1)."""
    k = _kernel(ctx.device, name)  # (ctx.kernel(name), one call less: hot ops use this)
    if k is None:
        return None
    for a in args:  # (a loop, not any(genexpr): this runs on every call of a hot op)
        if getattr(a, "ndim", 1) == 0:
            return None
    return k(*args)


def result_type(*arrays_or_dtypes):
    return np.result_type(*arrays_or_dtypes)


# ---- the C fast path ---------------------------------------------------------------------
# ``Op.apply`` is gpudiff._C's ``apply`` (csrc/cpu/dispatch.cpp) when the extension is built:
# the ``apply`` above in C for the common case (no autocast, capture, profiler or anomaly
# mode; host arrays on one device; not a view op), handing every other call to ``apply``.
# GPUDIFF_FAST_DISPATCH=0, or fast_dispatch(False), keeps the Python path for all calls.
_python_apply = Op.__dict__["apply"]


def fast_dispatch(enabled=True):
    """Use the C dispatch fast path (when built) for ``Op.apply``; returns whether it is on."""
    C = runtime._C
    on = bool(enabled) and C is not None and hasattr(C, "dispatch_init")
    if on and not getattr(fast_dispatch, "_ready", False):
        import sys

        from ..autograd import function as _function
        from ..autograd import grad_mode as _grad_mode
        from ..autograd import graph as _graph
        from ..runtime.dtypes import bfloat16
        C.dispatch_init({
            "Tensor": Tensor, "Node": _graph.Node, "SavedTensor": _graph.SavedTensor,
            "FunctionCtx": FunctionCtx, "ndarray": np.ndarray,
            "grad_state": _grad_mode._state, "autocast": autocast, "capture": capture,
            "events": events, "ops": sys.modules[__name__], "apply": apply,
            "function": _function, "emulated_own": runtime.emulated.own,
            "seq": _graph._seq,
            "float_dtypes": tuple(np.dtype(d) for d in (np.float32, np.float64, np.float16,
                                                         bfloat16)),
            "low_dtypes": LOW_FLOATS,
        })
        fast_dispatch._ready = True
    Op.apply = classmethod(C.apply) if on else _python_apply
    return on


import os as _os  # noqa: E402

fast_dispatch(_os.environ.get("GPUDIFF_FAST_DISPATCH", "1") != "0")

# the op modules register themselves on import
from . import (  # noqa: E402,F401
    activation,
    conv,
    device,
    dropout,
    elementwise,
    index,
    interpolate,
    linalg,
    norm,
    pool,
    reduce,
    shape,
    softmax,
)
