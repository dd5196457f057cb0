"""Tensor: an array (numpy or cupy) plus the autograd fields.

This module sits below the ops (docs/ARCHITECTURE.md): it never imports them. Every method
that runs an op (``x.exp()``, ``x + y``, ``x.to(...)``, ``x.clone()``, ``x[i] = v``) is the
public function of the same name, attached to the class by gpudiff/functions.py, so each is
written once. Here: the data model, conversions to host values, and the autograd fields and
methods (backward, hooks, in-place bookkeeping).
"""
import weakref

import numpy as np

from . import runtime
from .autograd import graph
from .autograd.function import check_inplace
from .autograd.grad_mode import is_grad_enabled
from .runtime import capture

_DEFAULT_DTYPE = [np.dtype("float32")]


def get_default_dtype():
    return _DEFAULT_DTYPE[0]


def set_default_dtype(d):
    _DEFAULT_DTYPE[0] = np.dtype(d)


class Tensor:
    """A multi-dimensional array on a device that can record the ops applied to it.

    >>> x = gpudiff.tensor([1.0, 2.0], requires_grad=True)
    >>> (x * x).sum().backward(); x.grad
    tensor([2., 4.])
    """

    __slots__ = ("array", "device", "_requires_grad", "grad", "grad_fn", "_output_nr",
                 "_version", "_hooks", "_retains_grad", "_base", "_base_fn", "__weakref__")
    __array_ufunc__ = None  # numpy defers to our reflected operators (ndarray + Tensor)

    def __init__(self, data=None, *, dtype=None, device=None, requires_grad=False):
        if data is None:
            data = []
        dev = runtime.device(device) if device is not None else runtime.default_device()
        arr = _to_array(data, dtype or get_default_dtype(), dev)
        self._init(arr, dev)
        self.requires_grad = requires_grad

    def _init(self, array, device, grad_fn=None, output_nr=0):
        self.array = array
        self.device = device
        self._requires_grad = grad_fn is not None
        self.grad = None
        self.grad_fn = grad_fn
        self._output_nr = output_nr
        self._version = [0]  # shared with views: in-place changes are seen by saved tensors
        self._base = None      # for a view: the tensor owning the memory, and its grad_fn
        self._base_fn = None   #   when the view was taken (see ops._check_views)
        self._hooks = None
        self._retains_grad = False

    @classmethod
    def _make(cls, array, device, grad_fn=None, output_nr=0):
        t = object.__new__(cls)
        t._init(array, device, grad_fn, output_nr)
        return t

    # ---- the raw-array API (for code that must work on arrays: optimizers, nn.init) -----
    # ``t.array`` is the numpy / cupy array itself and ``t.device.xp`` its array module; an
    # in-place write to ``t.array`` must be followed by ``t.bump_version()`` if autograd may
    # have saved ``t``. docs/ARCHITECTURE.md lists the places outside the engine that use it.
    @classmethod
    def from_array(cls, array, device):
        """A tensor holding ``array`` (no copy) on ``device``, outside any graph."""
        return cls._make(array, device)

    def bump_version(self):
        """Record an in-place change of ``self.array`` made outside the ops."""
        self._version[0] += 1

    # ---- attributes -------------------------------------------------------------------
    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag):
        if flag and self.array.dtype.kind != "c" and not runtime.is_floating(self.array.dtype):
            raise RuntimeError(f"only Tensors of floating point dtype can require gradients "
                               f"(this one is {self.array.dtype})")
        if not flag and self.grad_fn is not None:
            raise RuntimeError("you can only change requires_grad flags of leaf variables; "
                               "use .detach() to get a tensor without a graph")
        self._requires_grad = bool(flag)

    def requires_grad_(self, requires_grad=True):
        self.requires_grad = requires_grad
        return self

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self):
        return self.array.ndim

    def dim(self):
        return self.array.ndim

    def size(self, dim=None):
        return self.array.shape if dim is None else self.array.shape[dim]

    def numel(self):
        return int(self.array.size)

    def nelement(self):
        return int(self.array.size)

    def element_size(self):
        return self.array.itemsize

    @property
    def is_leaf(self):
        return self.grad_fn is None

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    @property
    def data(self):
        """A tensor sharing this one's memory, outside the graph (as torch's ``.data``)."""
        return Tensor._make(self.array, self.device)

    @data.setter
    def data(self, other):
        self.array = other.array if isinstance(other, Tensor) else other
        self.device = other.device if isinstance(other, Tensor) else self.device

    @property
    def T(self):
        return self.permute(*reversed(range(self.ndim)))

    @property
    def mT(self):
        return self.transpose(-2, -1)

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.shape[0]))

    __hash__ = object.__hash__

    # ---- conversion -------------------------------------------------------------------
    def numpy(self, *, force=False):
        capture.check_sync("Tensor.numpy()")
        if self.requires_grad and not force:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        if self.device.type != "cpu" and not force:
            raise TypeError(f"can't convert {self.device} tensor to numpy. Use Tensor.cpu() "
                            f"to copy the tensor to host memory first.")
        return runtime.to_numpy(self.array)

    def __array__(self, dtype=None, copy=None):
        capture.check_sync("numpy.asarray(tensor)")
        a = runtime.to_numpy(self.array)
        return a.astype(dtype) if dtype is not None else a

    def __dlpack__(self, *args, **kwargs):
        return self.array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def item(self):
        capture.check_sync("Tensor.item()")
        if self.array.size != 1:
            raise RuntimeError(f"a Tensor with {self.array.size} elements cannot be converted "
                               f"to Scalar")
        return runtime.to_numpy(self.array).reshape(()).item()

    def tolist(self):
        capture.check_sync("Tensor.tolist()")
        return runtime.to_numpy(self.array).tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if self.dtype.kind not in "iub":
            raise TypeError("only integer tensors of a single element can be converted to an "
                            "index")
        return int(self.item())

    def __bool__(self):
        capture.check_sync("bool(tensor) (an `if` or `while` on a tensor's value)")
        if self.array.size != 1:
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
        return bool(self.item())

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to(runtime.device("cuda" if device is None else
                                      (f"cuda:{device}" if isinstance(device, int) else device)))

    def type(self, dtype=None):
        return str(self.dtype) if dtype is None else self.to(dtype)

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    def half(self):
        return self.to(np.float16)

    def bfloat16(self):
        return self.to(runtime.bfloat16)

    def long(self):
        return self.to(np.int64)

    def int(self):
        return self.to(np.int32)

    def bool(self):
        return self.to(np.bool_)

    def is_floating_point(self):
        return runtime.is_floating(self.dtype)

    def detach(self):
        """A tensor sharing memory (and the version counter) with no graph."""
        t = Tensor._make(self.array, self.device)
        t._version = self._version
        return t

    def detach_(self):
        self.grad_fn, self._requires_grad = None, False
        return self

    def _own(self):
        """A copy that owns its memory (used for .grad accumulation buffers)."""
        return Tensor._make(self.device.xp.copy(self.array, order="C"), self.device)

    def is_contiguous(self):
        return bool(self.array.flags.c_contiguous)

    def _new(self, fill, size, dtype, device, *value):
        dev = self.device if device is None else runtime.device(device)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size,)
        with runtime.on_device(dev):
            a = getattr(dev.xp, fill)(size, *value, dtype=dtype or self.dtype)
        return Tensor._make(a, dev)

    def new_zeros(self, size, dtype=None, device=None):
        return self._new("zeros", size, dtype, device)

    def new_ones(self, size, dtype=None, device=None):
        return self._new("ones", size, dtype, device)

    def new_full(self, size, fill_value, dtype=None, device=None):
        return self._new("full", size, dtype, device, fill_value)

    def new_empty(self, size, dtype=None, device=None):
        return self._new("empty", size, dtype, device)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        return Tensor(data, dtype=dtype or self.dtype, device=device or self.device,
                      requires_grad=requires_grad)

    # ---- autograd ---------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """Accumulate d self / d leaf into every leaf's ``.grad`` (chain rule on the tape)."""
        graph.backward([self], None if gradient is None else [gradient], retain_graph, create_graph,
                 inputs=inputs)

    def register_hook(self, hook):
        """``hook(grad) -> grad or None`` runs when this tensor's gradient is computed."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require "
                               "gradient")
        if self.grad_fn is not None:
            self.grad_fn.add_pre_hook(self._output_nr, hook)
            hooks = self.grad_fn.pre_hooks[self._output_nr]
        else:
            if self._hooks is None:
                self._hooks = []
            self._hooks.append(hook)
            hooks = self._hooks
        return _RemovableHandle(hooks, hook)

    def retain_grad(self):
        """Keep ``.grad`` for this non-leaf tensor after backward."""
        if self.grad_fn is None:
            return
        if self._retains_grad:
            return
        ref = weakref.ref(self)

        def keep(g):
            t = ref()
            if t is not None:
                t.grad = g.detach()._own() if t.grad is None else t.grad + g.detach()
        self.grad_fn.add_pre_hook(self._output_nr, keep)
        self._retains_grad = True

    @property
    def retains_grad(self):
        return self._retains_grad

    # ---- in-place ---------------------------------------------------------------------
    def _inplace(self, out):
        """Make ``self`` hold ``out``: an out-of-place result computed from self, or a function
        ``f(src) -> out`` of a stand-in for self. With grad enabled the stand-in is a copy of
        self in the graph, so what the op saves for backward (e.g. ``mul`` saves its inputs)
        is not the buffer this in-place write overwrites."""
        if callable(out):
            out = out(self._alias() if is_grad_enabled() else self)
        recording = is_grad_enabled() and out.requires_grad
        if recording:
            check_inplace("in-place op", self)
        a = out.array
        if a.shape != self.shape:
            raise RuntimeError(f"in-place op: output shape {tuple(a.shape)} doesn't match the "
                               f"broadcast shape {tuple(self.shape)}")
        self._write(self.array.__setitem__, Ellipsis, a)  # (casts to self's dtype)
        self._version[0] += 1
        if recording:
            # self now stands for the op's output (what it saved stays in `out`'s own buffer)
            self.grad_fn, self._output_nr, self._requires_grad = out.grad_fn, out._output_nr, True
        return self

    def _alias(self):
        """A copy of self's values that stands for self in the graph (same grad_fn)."""
        copy = self.device.xp.copy(self.array, order="C")
        plan = capture.recording()
        if plan is not None:  # a replay copies this replay's values
            plan.add(lambda src=self.array: copy.__setitem__(Ellipsis, src))
        t = Tensor._make(copy, self.device, self.grad_fn, self._output_nr)
        t._requires_grad = self._requires_grad
        return t

    def _fast_inplace(self, ufunc, other):
        """No graph to record: apply the ufunc straight into our memory."""
        o = other.array if isinstance(other, Tensor) else other
        if isinstance(other, Tensor) and other.device != self.device:
            raise RuntimeError(f"{ufunc.__name__}_: expected all tensors to be on the same "
                               f"device, but found {self.device} and {other.device}")
        try:
            self._write(_ufunc_into, ufunc, self.array, o)
        except ValueError:  # NumPy's words are about "operands": say it as torch does
            try:
                shape = np.broadcast_shapes(self.shape, np.shape(o))
            except ValueError:
                raise RuntimeError(f"{ufunc.__name__}_: shapes {tuple(self.shape)} and "
                                   f"{tuple(np.shape(o))} cannot be broadcast together") from None
            raise RuntimeError(f"{ufunc.__name__}_: output with shape {tuple(self.shape)} "
                               f"doesn't match the broadcast shape {shape}") from None
        self._version[0] += 1
        return self

    def _write(self, fn, *args):
        """Run ``fn(*args)``, an in-place write of ``self.array``; inside a graph capture also
        record it as a step (runtime/capture.py)."""
        plan = capture.recording()
        if plan is not None:
            plan.static(self, weakref.ref)
            plan.will_write(self.array)
            plan.add(lambda: fn(*args))
        fn(*args)

    def _needs_graph(self, *others):
        return is_grad_enabled() and (self.requires_grad or any(
            isinstance(o, Tensor) and o.requires_grad for o in others))

    def add_(self, other, alpha=1):
        if self._needs_graph(other):
            return self._inplace(lambda s: s + (other if alpha == 1 else other * alpha))
        if alpha != 1:
            other = other * alpha
        return self._fast_inplace(self.device.xp.add, other)

    def sub_(self, other, alpha=1):
        if self._needs_graph(other):
            return self._inplace(lambda s: s - (other if alpha == 1 else other * alpha))
        if alpha != 1:
            other = other * alpha
        return self._fast_inplace(self.device.xp.subtract, other)

    def mul_(self, other):
        if self._needs_graph(other):
            return self._inplace(lambda s: s * other)
        return self._fast_inplace(self.device.xp.multiply, other)

    def div_(self, other):
        if self._needs_graph(other):
            return self._inplace(lambda s: s / other)
        return self._fast_inplace(self.device.xp.true_divide, other)

    def pow_(self, e):
        return self._inplace(lambda s: s ** e)

    def addcmul_(self, t1, t2, value=1):
        return self.add_(t1 * t2 * value)

    def addcdiv_(self, t1, t2, value=1):
        return self.add_(t1 / t2 * value)

    def lerp_(self, end, weight):
        return self.add_((end - self) * weight)

    def clamp_(self, min=None, max=None):
        return self._inplace(lambda s: s.clamp(min, max))

    clip_ = clamp_

    def masked_fill_(self, mask, value):
        return self._inplace(lambda s: s.masked_fill(mask, value))

    def zero_(self):
        return self.fill_(0)

    def fill_(self, value):
        if self._needs_graph(value):
            return self._inplace(lambda s: s * 0 + value)
        self._write(self.array.__setitem__, Ellipsis,
                    value.array if isinstance(value, Tensor) else value)
        self._version[0] += 1
        return self

    def copy_(self, src, non_blocking=False):
        if not isinstance(src, Tensor):
            src = Tensor(src, dtype=self.dtype)
        if self._needs_graph(src):
            return self._inplace(lambda s: s * 0 + src.to(self.device))
        if src.device == self.device:
            self._write(self.array.__setitem__, Ellipsis, src.array)
        else:
            capture.check_alloc(f"copy_ from {src.device} to {self.device}")
            self.array[...] = runtime.to_device(src.array, self.device)
        self._version[0] += 1
        return self

    def uniform_(self, a=0.0, b=1.0, generator=None):
        r = runtime.rng(generator).uniform(a, b, size=self.shape)
        return self._set_random(r)

    def normal_(self, mean=0.0, std=1.0, generator=None):
        r = runtime.rng(generator).normal(mean, std, size=self.shape)
        return self._set_random(r)

    def bernoulli_(self, p=0.5, generator=None):
        r = runtime.rng(generator).random(size=self.shape) < p
        return self._set_random(r)

    def exponential_(self, lambd=1.0, generator=None):
        r = runtime.rng(generator).exponential(1.0 / lambd, size=self.shape)
        return self._set_random(r)

    def random_(self, low=0, high=None, generator=None):
        r = runtime.rng(generator).integers(low, high, size=self.shape)
        return self._set_random(r)

    def _set_random(self, r):
        capture.check_alloc("uniform_/normal_/bernoulli_/random_ (numbers drawn on the host)")
        if self._needs_graph():
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation (initialise it inside gpudiff.no_grad())")
        self.array[...] = runtime.to_device(r.astype(self.dtype), self.device)
        self._version[0] += 1
        return self

    # ---- printing ---------------------------------------------------------------------
    def __repr__(self):
        capture.check_sync("printing a tensor (repr/str)")
        a = runtime.to_numpy(self.array)
        # as torch: integral floats as "1.", others with 4 decimals ("1.5000")
        mode = "maxprec_equal"
        if runtime.is_floating(a.dtype) and a.size:
            if a.dtype == runtime.bfloat16:  # (printed through float32: same values)
                a = a.astype(np.float32)
            finite = a[np.isfinite(a)]
            if finite.size and bool((finite != np.round(finite)).any()):
                mode = "fixed"
        body = np.array2string(a, separator=", ", prefix="tensor(",
                               precision=4, floatmode=mode)
        extras = []
        if self.device.type != "cpu":
            extras.append(f"device='{self.device}'")
        dt = self.array.dtype
        if dt not in (get_default_dtype(), np.dtype("int64"), np.dtype("bool")) \
                or (a.size == 0 and dt != get_default_dtype()):  # "[]" reads as float
            extras.append(f"dtype=gpudiff.{dt}")
        if self.grad_fn is not None:
            extras.append(f"grad_fn=<{self.grad_fn.name}Backward>")
        elif self.requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + body + "".join(", " + e for e in extras) + ")"

    def __reduce__(self):  # pickling (DataLoader workers): the host array only
        capture.check_sync("pickling a tensor")
        return (_rebuild, (runtime.to_numpy(self.array), str(self.device).split(" ")[0],
                           self.requires_grad))


def _rebuild(array, device, requires_grad):
    dev = runtime.device(device)
    t = Tensor._make(runtime.to_device(array, dev), dev)
    if requires_grad:
        t.requires_grad = True
    return t


class _RemovableHandle:
    def __init__(self, hooks, hook):
        self.hooks, self.hook = hooks, hook

    def remove(self):
        if self.hook in self.hooks:
            self.hooks.remove(self.hook)


# ---- array conversion (the factories in creation.py use it too) ---------------------------
def _infer_dtype(data):
    """PyTorch's inference: Python floats -> default float, ints -> int64, bools -> bool."""
    a = np.asarray(data)
    if a.dtype.kind == "f" and not isinstance(data, np.ndarray) and not isinstance(
            data, np.generic):
        return get_default_dtype()
    if a.dtype.kind in "iu" and not isinstance(data, (np.ndarray, np.generic)):
        return np.dtype("int64")
    if a.dtype.kind == "O":
        raise TypeError(f"tensor: could not infer a dtype from {type(data).__name__}")
    return a.dtype


def _to_array(data, dtype, dev):
    """``data`` (nested lists, scalars, arrays, Tensors) as a new array of ``dev``."""
    capture.check_alloc("tensor(data) (a tensor made from host data)")
    if isinstance(data, Tensor):
        data = runtime.to_numpy(data.array)
    if isinstance(data, (list, tuple)) and any(isinstance(d, Tensor) for d in data):
        data = [runtime.to_numpy(d.array) if isinstance(d, Tensor) else d for d in data]
    if runtime.is_array(data) and not isinstance(data, np.ndarray):
        a = data if dtype is None else data.astype(dtype)
        return runtime.to_device(a, dev)
    dt = None if dtype is None else np.dtype(dtype)
    a = np.array(data, dtype=dt or _infer_dtype(data))
    return runtime.to_device(a, dev)


def _ufunc_into(ufunc, a, o):
    ufunc(a, o, out=a, casting="unsafe")


graph.set_tensor_type(Tensor)  # the tape wraps gradients and saved tensors in it
