"""The tensor functions of the public API (``gpudiff.exp(x)``, also ``x.exp()``).

Each one normalises its arguments the way PyTorch does (Python scalars, dims, shapes),
checks them with errors that name the function and the shapes, and calls a primitive op
from gpudiff.ops. Composite functions (var, logsumexp, stack, ...) are built from those
primitives, so their gradients come for free.
"""
import builtins

import numpy as np

from . import runtime
from .ops import activation as N
from .runtime import autocast, capture
from .ops import device as D
from .ops import elementwise as E
from .ops import index as I
from .ops import linalg as L
from .ops import reduce as R
from .ops import shape as S
from .ops import softmax as Sm
from .ops.reduce import norm_dims
from .tensor import Tensor, _infer_dtype, get_default_dtype


# ---- argument helpers -----------------------------------------------------------------
def _scalar_dtype(t, value):
    """Dtype of a Python scalar next to tensor ``t`` (PyTorch's promotion rules)."""
    if isinstance(value, (bool, np.bool_)):
        return t.dtype if t.dtype.kind != "b" else np.dtype(bool)
    if isinstance(value, (int, np.integer)):
        return t.dtype if t.dtype.kind != "b" else np.dtype("int64")
    if isinstance(value, (float, np.floating)):
        return t.dtype if _is_float(t.dtype) else get_default_dtype()
    raise TypeError(f"unsupported operand type {type(value).__name__}")


def _wrap(value, like):
    """A Python number (or array) as a 0-d tensor on ``like``'s device."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)) or runtime.is_array(value):
        from .creation import tensor
        return tensor(value, device=like.device)
    dt = _scalar_dtype(like, value)
    return Tensor._make(like.device.xp.asarray(value, dtype=dt), like.device)


def _binary_args(name, a, b):
    """Tensors with a common dtype for an elementwise op; shapes must broadcast."""
    if not isinstance(a, Tensor):
        a = _wrap(a, b)
    if not isinstance(b, Tensor):
        b = _wrap(b, a)
    if a.dtype != b.dtype:
        dt = _promote(a, b)
        a = a if a.dtype == dt else a.to(dt)
        b = b if b.dtype == dt else b.to(dt)
    try:
        sa, sb = a.array.shape, b.array.shape
        if sa != sb and sa and sb:  # equal shapes and scalars always broadcast
            np.broadcast_shapes(sa, sb)
    except ValueError:
        raise RuntimeError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be "
                           f"broadcast together") from None
    return a, b


_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3, "V": 2}  # "V": bfloat16 (ml_dtypes)
_is_float = runtime.is_floating


def _promote(a, b):
    """PyTorch's result dtype: a higher category (bool < int < float) wins outright
    (int64 with float32 gives float32, not NumPy's float64); within a category the larger
    dtype; a 0-d tensor (or wrapped Python scalar) counts only if its category is higher
    than the dimensioned operand's."""
    if (a.ndim == 0) != (b.ndim == 0):
        dim, zero = (a, b) if b.ndim == 0 else (b, a)
        if _CATEGORY[zero.dtype.kind] <= _CATEGORY[dim.dtype.kind]:
            return dim.dtype
        return zero.dtype
    return _promote_dtypes(a.dtype, b.dtype)


def _promote_dtypes(*dtypes):
    """Result dtype of same-rank operands: the highest category wins, then the largest."""
    top = builtins.max(_CATEGORY[d.kind] for d in dtypes)
    return np.result_type(*[d for d in dtypes if _CATEGORY[d.kind] == top])


def _dims(dim):
    if isinstance(dim, list):
        return tuple(dim)
    return dim


def _shape(args):
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(int(a) for a in args)


# ---- arithmetic -----------------------------------------------------------------------
def _float_and_number(a, b):
    """Whether ``a`` is a floating Tensor and ``b`` a Python number (which keeps a's dtype):
    then the *_scalar ops apply, with no 0-d tensor made for ``b``."""
    return type(b) in (int, float) and isinstance(a, Tensor) and _is_float(a.dtype)


def add(input, other, *, alpha=1):
    if alpha != 1:
        other = mul(other, alpha) if isinstance(other, Tensor) else other * alpha
    if _float_and_number(input, other):
        return E.add_scalar.apply(input, other=other)
    if _float_and_number(other, input):
        return E.add_scalar.apply(other, other=input)
    return E.add.apply(*_binary_args("add", input, other))


def sub(input, other, *, alpha=1):
    if alpha != 1:
        other = mul(other, alpha) if isinstance(other, Tensor) else other * alpha
    if _float_and_number(input, other):
        return E.add_scalar.apply(input, other=-other)
    return E.sub.apply(*_binary_args("sub", input, other))


subtract = sub


def mul(input, other):
    if _float_and_number(input, other):
        return E.mul_scalar.apply(input, other=other)
    if _float_and_number(other, input):
        return E.mul_scalar.apply(other, other=input)
    return E.mul.apply(*_binary_args("mul", input, other))


multiply = mul


def div(input, other, *, rounding_mode=None):
    if rounding_mode == "floor":
        return floor_divide(input, other)
    a, b = _binary_args("div", input, other)
    if not _is_float(a.dtype):  # true division of integers gives floats (as torch)
        a, b = a.to(get_default_dtype()), b.to(get_default_dtype())
    out = E.div.apply(a, b)
    return out.trunc() if rounding_mode == "trunc" else out


divide = true_divide = div


def floor_divide(input, other):
    return E.floor_divide.apply(*_binary_args("floor_divide", input, other))


def remainder(input, other):
    return E.remainder.apply(*_binary_args("remainder", input, other))


def fmod(input, other):
    """C-style remainder: the sign of the dividend (torch.fmod), unlike ``remainder``."""
    a, b = _binary_args("fmod", input, other)
    r = remainder(a, b)
    # remainder has the divisor's sign: step back by one divisor where the signs differ
    return where(logical_and(r != 0, (r < 0) != (a < 0)), r - b, r)


def pow(input, exponent):
    if not isinstance(input, Tensor):  # number ** tensor
        dt = _scalar_dtype(exponent, input)  # as torch: 2 ** int64 is int64, 2.0 ** it float
        return E.rpow_scalar.apply(exponent if dt == exponent.dtype else exponent.to(dt),
                                   base=input)
    if isinstance(exponent, Tensor):
        return E.pow.apply(*_binary_args("pow", input, exponent))
    dt = _scalar_dtype(input, exponent)  # as torch: bool ** 2 is int64, int64 ** 0.5 float
    return E.pow_scalar.apply(input if dt == input.dtype else input.to(dt), exponent=exponent)


def _float_if_int(t):
    return t if _is_float(t.dtype) else t.to(get_default_dtype())


def neg(input):
    return E.neg.apply(input)


negative = neg


def maximum(input, other):
    return E.maximum.apply(*_binary_args("maximum", input, other))


def minimum(input, other):
    return E.minimum.apply(*_binary_args("minimum", input, other))


def where(condition, input=None, other=None):
    if input is None:
        return nonzero(condition, as_tuple=True)
    if not isinstance(input, Tensor) and not isinstance(other, Tensor):  # two numbers
        input = Tensor._make(condition.device.xp.asarray(input, dtype=_infer_dtype(input)),
                             condition.device)
    like = input if isinstance(input, Tensor) else other
    input, other = _binary_args("where", input if isinstance(input, Tensor) else
                                _wrap(input, like), other)
    if condition.dtype != np.bool_:
        condition = condition.to(np.bool_)
    try:
        np.broadcast_shapes(condition.shape, input.shape, other.shape)
    except ValueError:
        raise RuntimeError(f"where: condition {tuple(condition.shape)}, input "
                           f"{tuple(input.shape)} and other {tuple(other.shape)} cannot be "
                           f"broadcast together") from None
    return E.where.apply(condition, input, other)


def _unary(op):
    def fn(input):
        return op.apply(input)
    fn.__name__ = op.name
    fn.__doc__ = f"Elementwise {op.name}."
    return fn


def _unary_float(op):
    def fn(input):
        return op.apply(_float_if_int(input))
    fn.__name__ = op.name
    fn.__doc__ = f"Elementwise {op.name} (integers are promoted to the default float)."
    return fn


exp, log, log1p, sqrt, rsqrt, sin, cos = (_unary_float(o) for o in (
    E.exp, E.log, E.log1p, E.sqrt, E.rsqrt, E.sin, E.cos))
tanh, sigmoid, erf = (_unary_float(o) for o in (N.tanh, N.sigmoid, N.erf))
abs, sign, floor, ceil, round, relu = (_unary(o) for o in (
    E.abs, E.sign, E.floor, E.ceil, E.round, N.relu))
absolute = abs


def square(input):
    return mul(input, input)


def log2(input):
    return log(input) * (1 / np.log(2))


def log10(input):
    return log(input) * (1 / np.log(10))


def expm1(input):
    return exp(input) - 1


def trunc(input):
    return where(input >= 0, floor(input), ceil(input))


def reciprocal(input):
    if autocast.state is not None:
        input, = autocast.cast_inputs("reciprocal", (input,))
    return div(1.0, input)


def clamp(input, min=None, max=None):
    if isinstance(min, Tensor) or isinstance(max, Tensor):
        out = input
        if min is not None:
            out = maximum(out, min)
        if max is not None:
            out = minimum(out, max)
        return out
    if min is None and max is None:
        raise RuntimeError("clamp: at least one of 'min' or 'max' must not be None")
    return E.clamp.apply(input, min=min, max=max)


clip = clamp


def logical_not(input):
    return E.logical_not.apply(input)


def logical_and(input, other):
    return E.logical_and.apply(*_binary_args("logical_and", input, other))


def logical_or(input, other):
    return E.logical_or.apply(*_binary_args("logical_or", input, other))


def _cmp(op, name):
    def fn(input, other):
        return op.apply(*_binary_args(name, input, other))
    fn.__name__ = name
    return fn


eq, ne, gt, lt, ge, le = (_cmp(o, n) for o, n in (
    (E.eq, "eq"), (E.ne, "ne"), (E.gt, "gt"), (E.lt, "lt"), (E.ge, "ge"), (E.le, "le")))
greater, less, greater_equal, less_equal, not_equal = gt, lt, ge, le, ne


def equal(input, other):
    capture.check_sync("equal (a Python bool of device values)")
    return input.shape == other.shape and bool(eq(input, other).all())


def allclose(input, other, rtol=1e-5, atol=1e-8, equal_nan=False):
    capture.check_sync("allclose (a Python bool of device values)")
    return bool(np.allclose(np.asarray(input), np.asarray(other), rtol, atol, equal_nan))


def isnan(input):
    xp = input.device.xp
    return Tensor._make(xp.asarray(xp.isnan(input.array)), input.device)


def isinf(input):
    xp = input.device.xp
    return Tensor._make(xp.asarray(xp.isinf(input.array)), input.device)


def isfinite(input):
    xp = input.device.xp
    return Tensor._make(xp.asarray(xp.isfinite(input.array)), input.device)


# ---- reductions -----------------------------------------------------------------------
def sum(input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    elif input.dtype.kind in "bi" and input.dtype != np.int64:
        input = input.to(np.int64)  # torch sums bools and ints as int64
    return R.sum.apply(input, dim=_dims(dim), keepdim=keepdim)


def mean(input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    if not _is_float(input.dtype):
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either "
                           f"a floating point or complex dtype. Got: {input.dtype}")
    return R.mean.apply(input, dim=_dims(dim), keepdim=keepdim)


def prod(input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    return R.prod.apply(input, dim=_dims(dim), keepdim=keepdim)


def var(input, dim=None, unbiased=None, keepdim=False, *, correction=1):
    """Variance over ``dim`` with ``correction`` (Bessel's by default); also PyTorch's older
    spellings ``var(x, dim, unbiased, keepdim)`` and ``var(x, unbiased)``."""
    if isinstance(dim, bool):  # var(x, unbiased)
        dim, unbiased = None, dim
    if unbiased is not None:
        correction = int(unbiased)
    dims = norm_dims(_dims(dim), input.ndim)
    n = 1
    for d in dims:
        n *= input.shape[d]
    d = input - input.mean(dim=dims, keepdim=True)
    return (d * d).sum(dim=dims, keepdim=keepdim) / builtins.max(n - correction, 0)


def std(input, dim=None, unbiased=None, keepdim=False, *, correction=1):
    return var(input, dim, unbiased, keepdim, correction=correction).sqrt()


def var_mean(input, dim=None, *, correction=1, keepdim=False):
    return var(input, dim, correction=correction, keepdim=keepdim), mean(input, dim, keepdim)


def _minmax(input, dim, keepdim, largest, name):
    if isinstance(dim, Tensor):  # torch.max(a, b) is the elementwise maximum
        return (maximum if largest else minimum)(input, dim)
    if dim is None:
        if input.numel() == 0:
            raise RuntimeError(f"{name}(): Expected reduction dim to be specified for "
                               f"input.numel() == 0")
        return (R.amax if largest else R.amin).apply(input)
    vals, idx = R.max_dim.apply(input, dim=dim, keepdim=keepdim, largest=largest)
    return _MinMax(vals, idx)


class _MinMax(tuple):
    """(values, indices) with names, like torch.return_types.max."""

    def __new__(cls, values, indices):
        return super().__new__(cls, (values, indices))

    @property
    def values(self):
        return self[0]

    @property
    def indices(self):
        return self[1]


def max(input, dim=None, keepdim=False):
    return _minmax(input, dim, keepdim, True, "max")


def min(input, dim=None, keepdim=False):
    return _minmax(input, dim, keepdim, False, "min")


def amax(input, dim=None, keepdim=False):
    return R.amax.apply(input, dim=_dims(dim), keepdim=keepdim)


def amin(input, dim=None, keepdim=False):
    return R.amin.apply(input, dim=_dims(dim), keepdim=keepdim)


def argmax(input, dim=None, keepdim=False):
    return R.argmax.apply(input, dim=dim, keepdim=keepdim, largest=True)


def argmin(input, dim=None, keepdim=False):
    return R.argmax.apply(input, dim=dim, keepdim=keepdim, largest=False)


def all(input, dim=None, keepdim=False):
    return R.all.apply(input, dim=dim, keepdim=keepdim)


def any(input, dim=None, keepdim=False):
    return R.any.apply(input, dim=dim, keepdim=keepdim)


def logsumexp(input, dim, keepdim=False):
    """log(sum(exp(x), dim)), stable: the max is shifted out first."""
    if autocast.state is not None:
        input, = autocast.cast_inputs("logsumexp", (input,))
    m = amax(input, dim, keepdim=True).detach()
    m = where(isfinite(m), m, _zeros_like(m))
    out = (input - m).exp().sum(dim=dim, keepdim=True).log() + m
    return out if keepdim else out.squeeze(dim)


def _zeros_like(t):
    return t.new_zeros(t.shape)


def softmax(input, dim=None, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    return Sm.softmax.apply(_float_if_int(input), dim=_softmax_dim(input, dim))


def log_softmax(input, dim=None, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    return Sm.log_softmax.apply(_float_if_int(input), dim=_softmax_dim(input, dim))


def _softmax_dim(input, dim):
    if dim is None:  # PyTorch's legacy implicit choice
        dim = 0 if input.ndim in (0, 1, 3) else 1
    return norm_dims(dim, input.ndim)[0] if input.ndim else 0


def cumsum(input, dim, *, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    if input.ndim == 0:
        input = input.reshape(1)  # (torch: a 0-d input is its own cumsum)
        return R.cumsum.apply(input, dim=norm_dims(dim, 1)[0]).reshape(())
    return R.cumsum.apply(input, dim=norm_dims(dim, input.ndim)[0])


# ---- shapes ---------------------------------------------------------------------------
def reshape(input, *shape):
    shape, size = _shape(shape), input.numel()
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) == 1 and known and size % known == 0:
        shape = tuple(size // known if s == -1 else s for s in shape)
    if shape.count(-1) or int(np.prod(shape)) != size:
        raise RuntimeError(f"reshape: shape {list(shape)} is invalid for input of size {size} "
                           f"(shape {tuple(input.shape)})")
    if shape == input.shape:
        return input
    return S.reshape.apply(input, shape=shape)


def view(input, *shape):
    if len(shape) == 1 and not isinstance(shape[0], (int, tuple, list)):
        return input.to(shape[0])  # view(dtype) is a reinterpretation in torch; cast here
    return reshape(input, *shape)


def view_as(input, other):
    return reshape(input, other.shape)


def reshape_as(input, other):
    return reshape(input, other.shape)


def flatten(input, start_dim=0, end_dim=-1):
    if input.ndim == 0:
        return reshape(input, 1)
    s = start_dim % input.ndim
    e = end_dim % input.ndim
    shape = input.shape[:s] + (-1,) + input.shape[e + 1:]
    if input.numel() == 0:
        n = 1
        for k in input.shape[s:e + 1]:
            n *= k
        shape = input.shape[:s] + (n,) + input.shape[e + 1:]
    return reshape(input, shape)


def unflatten(input, dim, sizes):
    d = dim % input.ndim
    return reshape(input, input.shape[:d] + tuple(sizes) + input.shape[d + 1:])


def permute(input, *dims):
    dims = _shape(dims)
    if sorted(d % input.ndim for d in dims) != list(range(input.ndim)):
        raise RuntimeError(f"permute: dims {dims} are not a permutation of the "
                           f"{input.ndim} dims of a tensor of shape {tuple(input.shape)}")
    return S.permute.apply(input, dims=tuple(d % input.ndim for d in dims))


def transpose(input, dim0, dim1):
    if input.ndim < 2 and input.ndim == 0:
        return input
    p = list(range(input.ndim))
    d0, d1 = dim0 % input.ndim, dim1 % input.ndim
    p[d0], p[d1] = p[d1], p[d0]
    return S.permute.apply(input, dims=tuple(p))


swapaxes = swapdims = transpose


def movedim(input, source, destination):
    p = list(range(input.ndim))
    s = source % input.ndim
    p.pop(s)
    p.insert(destination % input.ndim, s)
    return S.permute.apply(input, dims=tuple(p))


def t(input):
    if input.ndim > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is "
                           f"{input.ndim}D")
    return transpose(input, 0, 1) if input.ndim == 2 else input


def squeeze(input, dim=None):
    if dim is None:
        shape = tuple(s for s in input.shape if s != 1)
    else:
        dims = norm_dims(dim, input.ndim) if input.ndim else ()
        shape = tuple(s for i, s in enumerate(input.shape) if not (i in dims and s == 1))
    return reshape(input, shape)


def unsqueeze(input, dim):
    d = dim % (input.ndim + 1)
    return reshape(input, input.shape[:d] + (1,) + input.shape[d:])


def expand(input, *sizes):
    sizes = _shape(sizes)
    lead = len(sizes) - input.ndim
    if lead < 0:
        raise RuntimeError(f"expand: the number of sizes provided ({len(sizes)}) must be "
                           f"greater or equal to the number of dimensions ({input.ndim})")
    shape = tuple(input.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))
    try:
        np.broadcast_shapes(input.shape, shape)
        if np.broadcast_shapes(input.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise RuntimeError(f"expand: the expanded size {shape} must match the existing size "
                           f"{tuple(input.shape)} at non-singleton dimensions") from None
    if shape == input.shape:
        return input
    return S.expand.apply(input, shape=shape)


def expand_as(input, other):
    return expand(input, other.shape)


def broadcast_to(input, shape):
    return expand(input, shape)


def repeat(input, *repeats):
    repeats = _shape(repeats)
    if len(repeats) < input.ndim:
        raise RuntimeError("repeat: number of repeat dims can not be smaller than number of "
                           "dimensions of tensor")
    return S.repeat.apply(input, repeats=repeats)


def flip(input, dims):
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return S.flip.apply(input, dims=tuple(d % input.ndim for d in dims))


def cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or list(tensors)
    if not tensors:
        raise RuntimeError("cat(): expected a non-empty list of Tensors")
    ref = tensors[0]
    d = dim % ref.ndim if ref.ndim else 0
    for i, t in enumerate(tensors):
        if t.ndim != ref.ndim or builtins.any(
                a != b for k, (a, b) in enumerate(zip(t.shape, ref.shape)) if k != d):
            raise RuntimeError(f"cat: sizes of tensors must match except in dimension {d}: "
                               f"tensor 0 has shape {tuple(ref.shape)}, tensor {i} has shape "
                               f"{tuple(t.shape)}")
    dt = _promote_dtypes(*[t.dtype for t in tensors])  # as torch: int64 with float32 is float32
    tensors = [t if t.dtype == dt else t.to(dt) for t in tensors]
    return S.cat.apply(*tensors, dim=d)


concat = concatenate = cat


def stack(tensors, dim=0):
    tensors = list(tensors)
    if not tensors:
        raise RuntimeError("stack expects a non-empty TensorList")
    for i, t in enumerate(tensors):
        if t.shape != tensors[0].shape:
            raise RuntimeError(f"stack expects each tensor to be equal size, but got "
                               f"{tuple(tensors[0].shape)} at entry 0 and {tuple(t.shape)} at "
                               f"entry {i}")
    d = dim % (tensors[0].ndim + 1)
    return cat([unsqueeze(t, d) for t in tensors], d)


def split(tensor, split_size_or_sections, dim=0):
    d = dim % tensor.ndim
    n = tensor.shape[d]
    if isinstance(split_size_or_sections, int):
        s = split_size_or_sections
        sizes = [builtins.min(s, n - i) for i in range(0, n, s)] or [0]
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {n} "
                               f"(input tensor's size at dimension {d}), but got "
                               f"split_sizes={sizes}")
    out, start = [], 0
    for s in sizes:
        out.append(S.slice_dim.apply(tensor, dim=d, start=start, stop=start + s))
        start += s
    return tuple(out)


def chunk(input, chunks, dim=0):
    n = input.shape[dim % input.ndim]
    size = -(-n // chunks)
    return split(input, builtins.max(size, 1), dim)


def unbind(input, dim=0):
    return tuple(squeeze(p, dim) for p in split(input, 1, dim))


def narrow(input, dim, start, length):
    return S.slice_dim.apply(input, dim=dim % input.ndim, start=start, stop=start + length)


# ---- indexing -------------------------------------------------------------------------
def _index_key(t, key):
    """A torch-style index (ints, slices, None, ..., Tensors, lists) as a raw-array key."""
    if not isinstance(key, tuple):
        key = (key,)
    out = []
    for k in key:
        if isinstance(k, Tensor):
            if k.device != t.device:
                raise RuntimeError(f"index: indices are on {k.device} but the indexed tensor "
                                   f"is on {t.device}")
            if k.dtype.kind not in "iub":
                raise IndexError(f"tensors used as indices must be long, int or bool tensors "
                                 f"(got {k.dtype})")
            if k.dtype.kind == "b":
                capture.check_shape_known("indexing with a boolean mask (x[mask])")
            out.append(k.array)
        elif isinstance(k, (list, np.ndarray)):
            capture.check_alloc("indexing with a Python list or NumPy array")
            out.append(runtime.to_device(np.asarray(k), t.device))
        else:
            out.append(k)
    return tuple(out)


def _getitem(input, key):
    k = _index_key(input, key)
    if len(k) == 1 and (k[0] is Ellipsis or (isinstance(k[0], slice) and k[0] == slice(None))):
        return input
    return I.getitem.apply(input, key=k)


def _setitem(input, key, value):
    """Out-of-place ``input[key] = value`` (for the graph-recording path of __setitem__)."""
    k = _index_key(input, key)
    if not isinstance(value, Tensor):
        value = _wrap(value, input)
    mask = input.new_ones(input.shape)
    mask_a = mask.array
    mask_a[k] = 0
    placed = I.index_put_zeros.apply(
        value.to(input.dtype).expand(input[key].shape).contiguous(), shape=input.shape, key=k)
    return input * mask + placed


def index_select(input, dim, index):
    key = (slice(None),) * (dim % input.ndim) + (index,)
    return _getitem(input, key)


def masked_fill(input, mask, value):
    if isinstance(value, Tensor) and value.ndim:
        raise RuntimeError("masked_fill only supports a 0-dimensional value tensor")
    if mask.dtype != np.bool_:
        raise RuntimeError(f"masked_fill: expected a bool mask, got {mask.dtype}")
    return where(mask, _wrap(value, input).to(input.dtype), input)


def gather(input, dim, index):
    if index.dtype.kind not in "iu":
        raise RuntimeError(f"gather(): Expected dtype int64 for index (got {index.dtype})")
    return I.gather.apply(input, index, dim=dim % input.ndim)


def scatter_add(input, dim, index, src):
    return I.scatter_add.apply(input, index, src, dim=dim % input.ndim)


def nonzero(input, as_tuple=False):
    capture.check_shape_known("nonzero")
    idx = input.device.xp.nonzero(input.array)
    if as_tuple:
        return tuple(Tensor._make(i.astype(np.int64), input.device) for i in idx)
    xp = input.device.xp
    return Tensor._make(xp.stack(idx, axis=1).astype(np.int64) if idx else
                        xp.zeros((0, 0), np.int64), input.device)


# ---- products -------------------------------------------------------------------------
def matmul(input, other):
    if autocast.state is not None:  # (before the dtype check below)
        input, other = autocast.cast_inputs("matmul", (input, other))
    L.check_matmul(input.shape, other.shape, input.dtype, other.dtype)
    return L.matmul.apply(input, other)


def mm(input, mat2):
    if input.ndim != 2 or mat2.ndim != 2:
        raise RuntimeError(f"mm: expected 2-D tensors, got shapes {tuple(input.shape)} and "
                           f"{tuple(mat2.shape)}")
    return matmul(input, mat2)


def bmm(input, mat2):
    if input.ndim != 3 or mat2.ndim != 3 or input.shape[0] != mat2.shape[0]:
        raise RuntimeError(f"bmm: expected 3-D tensors with the same batch size, got shapes "
                           f"{tuple(input.shape)} and {tuple(mat2.shape)}")
    return matmul(input, mat2)


def dot(input, other):
    if input.ndim != 1 or other.ndim != 1:
        raise RuntimeError(f"dot: 1D tensors expected, but got {input.ndim}D and "
                           f"{other.ndim}D tensors")
    if input.shape != other.shape:
        raise RuntimeError(f"dot: inconsistent tensor size, expected tensor {tuple(input.shape)}"
                           f" and src {tuple(other.shape)} to have the same number of elements")
    return matmul(input, other)


def outer(input, vec2):
    return mul(unsqueeze(input, 1), unsqueeze(vec2, 0))


ger = outer



# ---- the Tensor methods that run ops beyond the functions above -------------------------
def parse_to_args(*args, **kwargs):
    """(device, dtype) from the arguments of Tensor.to and Module.to (not exported: nn's
    Module.to uses it too)."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    for ignored in ("non_blocking", "memory_format", "copy"):  # (no asynchronous copies here)
        kwargs.pop(ignored, None)
    if kwargs:
        raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
    for a in args:
        if isinstance(a, Tensor):
            device, dtype = a.device, a.dtype
        elif isinstance(a, runtime.Device) or (isinstance(a, str) and
                                               a.split(":")[0] in ("cpu", "cuda")):
            device = a
        elif isinstance(a, bool):  # non_blocking positional
            continue
        elif a is not None:
            dtype = a
    if device is not None:
        device = runtime.device(device)
    return device, (None if dtype is None else np.dtype(dtype))


def _to(self, *args, **kwargs):
    """``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(other)``."""
    dev, dtype = parse_to_args(*args, **kwargs)
    out = self
    if dtype is not None and dtype != self.dtype:
        out = E.to_dtype.apply(out, dtype=dtype)
    if dev is not None:
        if dev != out.device:
            capture.check_alloc(f"to({dev}) from {out.device}")
            out = D.to_device.apply(out, device=dev)
    return out


def clone(input, memory_format=None):
    """A copy in new memory that stays in the graph (its gradient flows to ``input``)."""
    return E.clone.apply(input)


def contiguous(input, memory_format=None):
    if input.array.flags.c_contiguous:
        return input
    return S.contiguous.apply(input)


def _tensor_setitem(self, key, value):
    if self._needs_graph(value):
        self._inplace(lambda s: _setitem(s, key, value))
        return
    v = value.array if isinstance(value, Tensor) else value
    k = _index_key(self, key)
    try:
        self._write(self.array.__setitem__, k, v)
    except ValueError:
        raise RuntimeError(f"setitem: shape mismatch: value of shape {tuple(np.shape(v))} "
                           f"cannot be broadcast to the indexed shape "
                           f"{tuple(self.array[k].shape)}") from None
    self._version[0] += 1


# The Tensor methods that are these functions, attached once (x.exp() is exp(x)).
METHODS = """add sub subtract mul multiply div divide true_divide floor_divide remainder fmod
pow neg negative maximum minimum where exp log log1p log2 log10 expm1 sqrt rsqrt sin cos tanh
sigmoid erf abs absolute sign floor ceil round trunc relu square reciprocal clamp clip
logical_not logical_and logical_or eq ne gt lt ge le greater less greater_equal less_equal
not_equal equal allclose isnan isinf isfinite sum mean prod var std max min amax amin argmax
argmin all any logsumexp softmax log_softmax cumsum reshape view view_as reshape_as flatten
unflatten permute transpose swapaxes swapdims movedim t squeeze unsqueeze expand expand_as
broadcast_to repeat flip split chunk unbind narrow index_select masked_fill gather scatter_add
nonzero matmul mm bmm dot outer clone contiguous""".split()


def _tensor_where(self, condition, other):
    """``x.where(cond, y)`` is ``where(cond, x, y)`` (torch's method order)."""
    return where(condition, self, other)


def _attach():
    g = globals()
    for name in METHODS:
        setattr(Tensor, name, g[name])
    Tensor.where = _tensor_where
    Tensor.abs = abs
    Tensor.__getitem__ = _getitem
    Tensor.__setitem__ = _tensor_setitem
    Tensor.to = _to
    Tensor.__add__ = add
    Tensor.__radd__ = lambda self, other: add(other, self)
    Tensor.__sub__ = sub
    Tensor.__rsub__ = lambda self, other: sub(other, self)
    Tensor.__mul__ = mul
    Tensor.__rmul__ = lambda self, other: mul(other, self)
    Tensor.__truediv__ = div
    Tensor.__rtruediv__ = lambda self, other: div(other, self)
    Tensor.__floordiv__ = floor_divide
    Tensor.__rfloordiv__ = lambda self, other: floor_divide(other, self)
    Tensor.__mod__ = remainder
    Tensor.__rmod__ = lambda self, other: remainder(other, self)
    Tensor.__pow__ = pow
    Tensor.__rpow__ = lambda self, other: pow(other, self)
    Tensor.__matmul__ = matmul
    Tensor.__rmatmul__ = lambda self, other: matmul(_wrap(other, self), self)
    Tensor.__neg__ = neg
    Tensor.__abs__ = abs
    Tensor.__eq__ = eq
    Tensor.__ne__ = ne
    Tensor.__lt__ = lt
    Tensor.__le__ = le
    Tensor.__gt__ = gt
    Tensor.__ge__ = ge
    Tensor.__invert__ = logical_not
    Tensor.__and__ = logical_and
    Tensor.__or__ = logical_or
    Tensor.__iadd__ = lambda self, o: self.add_(o)
    Tensor.__isub__ = lambda self, o: self.sub_(o)
    Tensor.__imul__ = lambda self, o: self.mul_(o)
    Tensor.__itruediv__ = lambda self, o: self.div_(o)


_attach()


# what `from gpudiff.functions import *` (gpudiff's namespace) takes: the functions above
__all__ = sorted(n for n, v in list(globals().items())
                 if not n.startswith("_") and callable(v) and not isinstance(v, type)
                 and getattr(v, "__module__", None) == __name__ and n != "parse_to_args")
