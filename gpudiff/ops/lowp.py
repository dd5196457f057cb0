"""float16 / bfloat16 inputs for ops whose maths needs float32: reductions, matrix products,
convolutions, pooling, batch norm, softmax and cross-entropy.

``compute_in_float32(op)`` wraps the op's ``forward`` and ``backward_arrays``: when one of
their arrays is float16 or bfloat16, every floating array goes in as float32 (the device's
float32 kernels then run), and floating outputs are rounded back to the low dtype (that of
the first array when it is low, else of the first low array). This is what PyTorch's CPU
kernels do (float32 accumulation, one rounding at the end); batch norm keeps float32
statistics and affine parameters beside low-precision activations (as cuDNN does), and its
running statistics, updated in place, are written back into the caller's arrays.

float32 / float64 calls pay one dtype test per array. What a wrapped forward saves for
backward is put back to the caller's arrays (the low-precision input, the rounded output), so
saved tensors keep their graph links; ``backward_arrays`` gets float32 gradients and NumPy
promotes its mixed products to float32; the engine rounds each gradient to its input's
dtype.
"""
from ..runtime.dtypes import LOW_FLOATS, float32, float64, is_floating

_F32 = float32
_F64 = float64


def _low_dtype(arrays):
    """The low dtype of a call (None: no float16 / bfloat16 array)."""
    low = None
    for a in arrays:
        if a is not None and getattr(a, "dtype", None) in LOW_FLOATS:
            if low is None:
                low = a.dtype
            if a is arrays[0]:
                return a.dtype
    return low


def _up(a):
    if a is None or not hasattr(a, "dtype") or not is_floating(a.dtype) or a.dtype == _F32:
        return a
    return a.astype(_F32)


def _down(o, low):
    if hasattr(o, "dtype") and o.dtype == _F32:
        return o.astype(low)
    return o


def _wrap(fn, writes=(), native_cuda=False):
    def run(ctx, *arrays, **params):
        for a in arrays:  # (identity tests first: this runs on every call of the op)
            if a is not None:
                d = a.dtype
                if d is not _F32 and d is not _F64 and d in LOW_FLOATS:
                    break
        else:
            return fn(ctx, *arrays, **params)
        low = _low_dtype(arrays)
        if native_cuda and ctx.device.type == "cuda":
            # the CUDA kernels take float16 / bfloat16 themselves (tensor cores, float32
            # accumulation); the reference they fall back to computes in float32
            out = fn(ctx, *arrays, **params)
            if isinstance(out, tuple):
                return tuple(_to(o, low) for o in out)
            return _to(out, low)
        ups = [_up(a) for a in arrays]
        out = fn(ctx, *ups, **params)
        for i in writes:  # in-place updates of a low-precision input: write them back
            if arrays[i] is not None and ups[i] is not arrays[i]:
                arrays[i][...] = ups[i]
        if out is NotImplemented or out is None:
            return out
        multi = isinstance(out, tuple)
        outs = out if multi else (out,)
        downs = tuple(None if o is None else _down(o, low) for o in outs)
        if ctx._to_save or ctx._non_diff:  # what it saved / marked: the caller's arrays
            swap = {id(u): a for u, a in zip(ups, arrays) if u is not a}
            swap.update((id(o), d) for o, d in zip(outs, downs) if o is not d)
            ctx._to_save = tuple(swap.get(id(v), v) for v in ctx._to_save)
            ctx._non_diff = tuple(swap.get(id(v), v) for v in ctx._non_diff)
        return downs if multi else downs[0]
    run.__name__ = getattr(fn, "__name__", "forward")
    run.__wrapped__ = fn
    run.lowp_inner = fn  # what it calls when no array is float16 / bfloat16: the C dispatch
    return run           # path (csrc/cpu/dispatch.cpp) calls that directly then


def _to(o, low):
    if o is not None and hasattr(o, "dtype") and o.dtype != low and is_floating(o.dtype):
        return o.astype(low)
    return o


def sum32(a, axis):
    """``a.sum(axis)``, accumulated in float32 for float16 / bfloat16 (a float32 result: the
    engine rounds a gradient to its input's dtype)."""
    return a.sum(axis=axis, dtype=_F32) if a.dtype in LOW_FLOATS else a.sum(axis=axis)


def upcast_ref(ref):
    """A reference function ``ref(ctx, *arrays, g)`` that computes float16 / bfloat16 arrays in
    float32 and rounds its result back (what a CUDA kernel that declined falls back to)."""
    def run(ctx, *args):
        low = _low_dtype([a for a in args if hasattr(a, "dtype")])
        if low is None:
            return ref(ctx, *args)
        return _to(ref(ctx, *[_up(a) for a in args]), low)
    run.__name__ = ref.__name__
    return run


def _wrap_backward(fn, native_cuda=False):
    """backward_arrays: float32 in (gy and saved arrays alike), float32 out (the engine
    rounds each gradient to its input's dtype)."""
    def run(ctx, *gys):
        for g in gys:
            if g is not None:
                d = g.dtype
                if d is not _F32 and d is not _F64 and d in LOW_FLOATS:
                    break
        else:
            return fn(ctx, *gys)
        if native_cuda and ctx.device.type == "cuda":
            return fn(ctx, *gys)
        return fn(ctx, *[_up(g) for g in gys])
    run.__name__ = getattr(fn, "__name__", "backward_arrays")
    run.__wrapped__ = fn
    return run


def compute_in_float32(*ops, native_cuda=False):
    """Make ``ops`` (Op classes) run float16 / bfloat16 inputs in float32 (module doc).
    ``native_cuda``: on a cuda device the op gets its float16 / bfloat16 arrays as they are
    (its kernels take them; its reference must then upcast, see ``upcast_ref``)."""
    for op in ops:
        writes = tuple(op.arg_names.index(n) for n in op.writes)
        op.forward = staticmethod(_wrap(op.forward, writes, native_cuda))
        if op.backward_arrays is not None:
            op.backward_arrays = staticmethod(_wrap_backward(op.backward_arrays, native_cuda))
    return ops

